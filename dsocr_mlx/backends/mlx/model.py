"""DeepSeek-OCR and DeepSeek-OCR-2 in MLX: the vision towers and projector composed into image
embeddings (SAM + CLIP for v1, SAM + the Qwen2 encoder for v2), and the MoE decoder."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...config import ModelArgs
from ...weights import CONV_WEIGHTS, EXPERT_KEY
from .cache import BatchKVCache, KVCache, make_batch_cache, make_cache
from .clip import ClipVisionTower
from .decoder import DecoderLayer
from .projector import Projector
from .qwen2 import Qwen2Encoder
from .sam import SamEncoder


class DeepseekOCRModel(nn.Module):
    """``model.*`` of the checkpoint: the vision towers and the decoder body."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.is_v2 = args.is_v2
        self.sam_model = SamEncoder(args.sam)
        if args.is_v2:
            self.qwen2_model = Qwen2Encoder(args.qwen2)
        else:
            self.vision_model = ClipVisionTower(args.clip)
            self.image_newline = mx.zeros((args.projector.n_embed,))
        self.projector = Projector(args.projector)
        self.view_seperator = mx.zeros((args.projector.n_embed,))  # (sic) checkpoint name
        t = args.text
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = [DecoderLayer(t, i) for i in range(t.num_hidden_layers)]
        self.norm = nn.RMSNorm(t.hidden_size, eps=t.rms_norm_eps)

    def encode_view(self, pixels: mx.array) -> mx.array:
        """Pixels ``(B, S, S, 3)`` -> projected features ``(B, g, g, 1280)`` with ``g = S / 64``."""
        sam = self.sam_model(pixels)  # (B, g, g, C)
        if self.is_v2:
            B, g, _, _ = sam.shape
            return self.projector(self.qwen2_model(sam)).reshape(B, g, g, -1)
        B, g, _, C = sam.shape
        clip = self.vision_model(sam)[:, 1:]  # (B, g*g, 1024), class token dropped
        features = mx.concatenate([clip, sam.reshape(B, g * g, C)], axis=-1)  # CLIP first, as the reference
        return self.projector(features).reshape(B, g, g, -1)

    def with_newlines(self, grid: mx.array) -> mx.array:
        """``(rows, cols, D)`` -> ``(rows * (cols + 1), D)`` with ``image_newline`` closing each row."""
        rows, _, D = grid.shape
        newline = mx.broadcast_to(self.image_newline.astype(grid.dtype), (rows, 1, D))
        return mx.concatenate([grid, newline], axis=1).reshape(-1, D)

    def encode_images(self, global_pixels: mx.array, crop_pixels: mx.array | None, crop_grid: np.ndarray) -> mx.array:
        """All image-token embeddings of a prompt, in the order they are scattered into it.

        Per image: the local tile mosaic (newline after each full mosaic row), then the global view
        (newline after each row), then ``view_seperator``. DeepSeek-OCR-2 has no newlines: each tile's
        query outputs in row-major tile order, then the global view's.
        """
        tile_features = self.encode_view(crop_pixels) if crop_pixels is not None and crop_pixels.shape[0] else None
        global_features = self.encode_view(global_pixels)
        if self.is_v2:
            return self._encode_images_v2(global_features, tile_features, crop_grid)
        pieces, tile = [], 0
        for i, (cols, rows) in enumerate(np.asarray(crop_grid).reshape(-1, 2).tolist()):
            if cols > 1 or rows > 1:
                tiles = tile_features[tile : tile + cols * rows]  # (rows*cols, h2, w2, D), row-major tiles
                tile += cols * rows
                _, h2, w2, D = tiles.shape
                mosaic = tiles.reshape(rows, cols, h2, w2, D).transpose(0, 2, 1, 3, 4).reshape(rows * h2, cols * w2, D)
                pieces.append(self.with_newlines(mosaic))
            pieces.append(self.with_newlines(global_features[i]))
            pieces.append(self.view_seperator.astype(global_features.dtype)[None])
        return mx.concatenate(pieces, axis=0)

    def _encode_images_v2(
        self, global_features: mx.array, tile_features: mx.array | None, crop_grid: np.ndarray
    ) -> mx.array:
        D = global_features.shape[-1]
        pieces, tile = [], 0
        for i, (cols, rows) in enumerate(np.asarray(crop_grid).reshape(-1, 2).tolist()):
            if cols > 1 or rows > 1:
                pieces.append(tile_features[tile : tile + cols * rows].reshape(-1, D))
                tile += cols * rows
            pieces.append(global_features[i].reshape(-1, D))
            pieces.append(self.view_seperator.astype(global_features.dtype)[None])
        return mx.concatenate(pieces, axis=0)

    def get_input_embeddings(
        self, input_ids: mx.array, image_embeddings: mx.array | None = None, image_mask: np.ndarray | None = None
    ) -> mx.array:
        """Token embeddings with the image rows written at the ``<image>`` positions (batch of 1)."""
        embeds = self.embed_tokens(input_ids)
        if image_embeddings is None:
            return embeds
        mask = np.asarray(image_mask, dtype=bool).reshape(-1)
        if int(mask.sum()) != image_embeddings.shape[0]:
            raise ValueError(
                f"the prompt has {int(mask.sum())} <image> tokens but the images produce "
                f"{image_embeddings.shape[0]} embedding rows"
            )
        # Row r of the image sequence goes to the r-th masked position (masked_scatter_ order).
        rows = mx.array(np.clip(np.cumsum(mask) - 1, 0, None).astype(np.int32))
        scattered = image_embeddings.astype(embeds.dtype)[rows]
        return mx.where(mx.array(mask)[:, None], scattered, embeds[0])[None]

    def __call__(
        self, inputs: mx.array, cache: list[KVCache] | None = None, input_embeddings: mx.array | None = None
    ) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        mask = cache[0].attention_mask(h.shape[1]) if cache else ("causal" if h.shape[1] > 1 else None)
        cache = cache or [None] * len(self.layers)
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(nn.Module):
    """``DeepseekOCRForCausalLM``: the body plus the untied ``lm_head``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = DeepseekOCRModel(args)
        self.lm_head = nn.Linear(args.text.hidden_size, args.text.vocab_size, bias=False)

    def __call__(
        self, inputs: mx.array, cache: list[KVCache] | None = None, input_embeddings: mx.array | None = None
    ) -> mx.array:
        return self.lm_head(self.model(inputs, cache, input_embeddings))

    def make_cache(self) -> list[KVCache]:
        return make_cache(len(self.layers))

    def make_batch_cache(self) -> list[BatchKVCache]:
        return make_batch_cache(len(self.layers))

    @property
    def layers(self) -> list[Any]:
        return self.model.layers

    def encode_images(self, global_pixels: mx.array, crop_pixels: mx.array | None, crop_grid: np.ndarray) -> mx.array:
        return self.model.encode_images(global_pixels, crop_pixels, crop_grid)

    def get_input_embeddings(
        self, input_ids: mx.array, image_embeddings: mx.array | None = None, image_mask: np.ndarray | None = None
    ) -> mx.array:
        return self.model.get_input_embeddings(input_ids, image_embeddings, image_mask)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Original checkpoint -> MLX layout: convs to OHWI, routed experts stacked per projection."""
        out, experts = {}, {}
        for key, value in weights.items():
            m = EXPERT_KEY.match(key)
            if m:
                experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = value
            elif key in CONV_WEIGHTS:
                # PyTorch convs are (out, in, kh, kw); MLX convs are (out, kh, kw, in).
                out[key] = value.transpose(0, 2, 3, 1)
            else:
                out[key] = value
        for (prefix, proj), by_index in experts.items():
            missing = sorted(set(range(max(by_index) + 1)) - set(by_index))
            if missing:
                raise ValueError(f"{prefix}.{missing[0]}.{proj}.weight is missing from the checkpoint")
            out[f"{prefix}.{proj}.weight"] = mx.stack([by_index[e] for e in sorted(by_index)])
        return out
