"""DeepSeek-OCR and DeepSeek-OCR-2 in PyTorch: the vision towers and projector composed into image
embeddings (SAM + CLIP for v1, SAM + the Qwen2 encoder for v2), and the MoE decoder."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ...config import ModelArgs
from ...weights import CONV_WEIGHTS, EXPERT_KEY
from .cache import BatchKVCache, KVCache, make_batch_cache, make_cache
from .clip import ClipVisionTower
from .decoder import DecoderLayer, Linear, RMSNorm
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
            self.image_newline = nn.Parameter(torch.zeros(args.projector.n_embed))
        self.projector = Projector(args.projector)
        self.view_seperator = nn.Parameter(torch.zeros(args.projector.n_embed))  # (sic) checkpoint name
        t = args.text
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(t, i) for i in range(t.num_hidden_layers)])
        self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps)

    def encode_view(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, 3, S, S)`` -> projected features ``(B, g, g, 1280)`` with ``g = S / 64``."""
        sam = self.sam_model(pixels)  # (B, g, g, C)
        if self.is_v2:
            B, g, _, _ = sam.shape
            return self.projector(self.qwen2_model(sam)).reshape(B, g, g, -1)
        B, g, _, C = sam.shape
        clip = self.vision_model(sam)[:, 1:]  # (B, g*g, 1024), class token dropped
        features = torch.cat([clip, sam.reshape(B, g * g, C)], dim=-1)  # CLIP first, as the reference
        return self.projector(features).reshape(B, g, g, -1)

    def with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """``(rows, cols, D)`` -> ``(rows * (cols + 1), D)`` with ``image_newline`` closing each row."""
        rows, _, D = grid.shape
        newline = self.image_newline.to(grid.dtype).expand(rows, 1, D)
        return torch.cat([grid, newline], dim=1).reshape(-1, D)

    def encode_images(
        self, global_pixels: torch.Tensor, crop_pixels: torch.Tensor | None, crop_grid: np.ndarray
    ) -> torch.Tensor:
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
                mosaic = tiles.reshape(rows, cols, h2, w2, D).permute(0, 2, 1, 3, 4).reshape(rows * h2, cols * w2, D)
                pieces.append(self.with_newlines(mosaic))
            pieces.append(self.with_newlines(global_features[i]))
            pieces.append(self.view_seperator.to(global_features.dtype)[None])
        return torch.cat(pieces, dim=0)

    def _encode_images_v2(
        self, global_features: torch.Tensor, tile_features: torch.Tensor | None, crop_grid: np.ndarray
    ) -> torch.Tensor:
        D = global_features.shape[-1]
        pieces, tile = [], 0
        for i, (cols, rows) in enumerate(np.asarray(crop_grid).reshape(-1, 2).tolist()):
            if cols > 1 or rows > 1:
                pieces.append(tile_features[tile : tile + cols * rows].reshape(-1, D))
                tile += cols * rows
            pieces.append(global_features[i].reshape(-1, D))
            pieces.append(self.view_seperator.to(global_features.dtype)[None])
        return torch.cat(pieces, dim=0)

    def get_input_embeddings(
        self,
        input_ids: torch.Tensor,
        image_embeddings: torch.Tensor | None = None,
        image_mask: np.ndarray | None = None,
    ) -> torch.Tensor:
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
        embeds = embeds.clone()
        embeds[0, torch.from_numpy(mask).to(embeds.device)] = image_embeddings.to(embeds.dtype)
        return embeds

    def forward(
        self,
        inputs: torch.Tensor | None,
        cache: list[KVCache] | None = None,
        input_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
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
        self.lm_head = Linear(args.text.hidden_size, args.text.vocab_size, bias=False)

    def forward(
        self,
        inputs: torch.Tensor | None,
        cache: list[KVCache] | None = None,
        input_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.lm_head(self.model(inputs, cache, input_embeddings))

    def make_cache(self, max_length: int | None = None) -> list[KVCache]:
        return make_cache(len(self.layers), max_length)

    def make_batch_cache(self) -> list[BatchKVCache]:
        return make_batch_cache(len(self.layers))

    @property
    def layers(self) -> list[Any]:
        return self.model.layers

    def encode_images(
        self, global_pixels: torch.Tensor, crop_pixels: torch.Tensor | None, crop_grid: np.ndarray
    ) -> torch.Tensor:
        return self.model.encode_images(global_pixels, crop_pixels, crop_grid)

    def get_input_embeddings(
        self,
        input_ids: torch.Tensor,
        image_embeddings: torch.Tensor | None = None,
        image_mask: np.ndarray | None = None,
    ) -> torch.Tensor:
        return self.model.get_input_embeddings(input_ids, image_embeddings, image_mask)

    @staticmethod
    def destination(key: str) -> tuple[str, int | None]:
        """Where checkpoint tensor ``key`` goes: a parameter name, and the expert's row of a stacked one."""
        m = EXPERT_KEY.match(key)
        return (f"{m.group(1)}.{m.group(3)}.weight", int(m.group(2))) if m else (key, None)

    @staticmethod
    def sanitize(weights: dict[str, torch.Tensor], channels_last_convs: bool = False) -> dict[str, torch.Tensor]:
        """Checkpoint -> this layout: routed experts stacked per projection; convs back to (out, in, kh, kw)
        when they come from an MLX folder (``channels_last_convs``). Empties ``weights``."""
        out, experts = {}, {}
        # The input dict is consumed so that each expert's tensor is freed once stacked: the weights are
        # never held twice.
        for key in list(weights):
            value = weights.pop(key)
            m = EXPERT_KEY.match(key)
            if m:
                experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = value
            elif key in CONV_WEIGHTS and channels_last_convs:
                out[key] = value.permute(0, 3, 1, 2)
            else:
                out[key] = value
        for prefix, proj in list(experts):
            by_index = experts.pop((prefix, proj))
            missing = sorted(set(range(max(by_index) + 1)) - set(by_index))
            if missing:
                raise ValueError(f"{prefix}.{missing[0]}.{proj}.weight is missing from the checkpoint")
            out[f"{prefix}.{proj}.weight"] = torch.stack([by_index.pop(e) for e in sorted(by_index)])
        return out
