"""The MLX backend: strict, lazy checkpoint loading and the runtime the pipeline drives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ...config import ModelArgs
from ...processing import ProcessedInputs
from ...sampling import SamplingParams
from ...weights import check_checkpoint, checkpoint_shapes, safetensors_shapes, weight_files
from .generate import generate_step, make_logits_processors, make_sampler, prefill
from .model import Model

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def expert_dtype(key: str, dtype: mx.Dtype) -> mx.Dtype:
    """MLX's CPU backend runs gathered expert matmuls in float32 only, so experts stay float32 there."""
    if ".mlp.experts." in key and mx.default_device() == mx.cpu:
        return mx.float32
    return dtype


def load_model(folder: str | Path, args: ModelArgs, dtype: str = "float16") -> Model:
    """Build the model from ``args`` and fill it from the original checkpoint in ``folder``.

    Tensors are read lazily and cast one by one, so peak memory stays close to the weights in ``dtype``.
    """
    files = weight_files(folder)
    check_checkpoint(safetensors_shapes(files), checkpoint_shapes(args), f"the checkpoint in {folder}")
    weights = {}
    for f in files:
        weights.update(mx.load(str(f)))
    weights = Model.sanitize(weights)
    target = DTYPES[dtype]
    model = Model(args)
    model.load_weights([(k, v.astype(expert_dtype(k, target))) for k, v in weights.items()], strict=True)
    del weights
    # Materialise tensor by tensor so each source is read, cast and released before the next.
    for _, value in tree_flatten(model.parameters()):
        mx.eval(value)
    model.eval()
    return model


class Runtime:
    """What the backend-neutral pipeline calls: vision, prefill logits and token generation."""

    name = "mlx"

    def __init__(self, model: Model, dtype: str):
        self.model = model
        self.dtype = dtype

    @classmethod
    def load(cls, folder: str | Path, args: ModelArgs, dtype: str) -> Runtime:
        return cls(load_model(folder, args, dtype), dtype)

    def image_embeddings(self, inputs: ProcessedInputs) -> mx.array | None:
        if inputs.global_pixels.shape[0] == 0:
            return None
        dtype = DTYPES[self.dtype]
        # The one place where NCHW pixels become MLX's NHWC.
        global_pixels = mx.array(inputs.global_pixels.transpose(0, 2, 3, 1)).astype(dtype)
        crops = None
        if inputs.crop_pixels.shape[0]:
            crops = mx.array(inputs.crop_pixels.transpose(0, 2, 3, 1)).astype(dtype)
        out = self.model.model.encode_images(global_pixels, crops, inputs.images_spatial_crop)
        mx.eval(out)
        return out

    def input_embeddings(self, inputs: ProcessedInputs, image_embeddings: mx.array | None) -> mx.array:
        ids = mx.array(inputs.input_ids[None].astype(np.int32))
        return self.model.model.get_input_embeddings(ids, image_embeddings, inputs.images_seq_mask)

    def prefill_logits(self, inputs: ProcessedInputs, image_embeddings: mx.array | None) -> np.ndarray:
        embeds = self.input_embeddings(inputs, image_embeddings)
        logits = prefill(self.model, embeds, self.model.make_cache())
        return np.array(logits[0], dtype=np.float32)

    def generate(self, inputs: ProcessedInputs, image_embeddings: mx.array | None, max_tokens: int,
                 params: SamplingParams | None = None) -> Iterator[int]:
        """Token ids one by one (the caller stops on EOS); greedy with no processors by default."""
        params = params or SamplingParams(no_repeat_ngram_size=0)
        embeds = self.input_embeddings(inputs, image_embeddings)
        prompt = inputs.input_ids.tolist()
        sampler = make_sampler(params.temperature, params.top_p, params.top_k, params.seed)
        for token, _ in generate_step(prompt, self.model, input_embeddings=embeds, max_tokens=max_tokens,
                                      sampler=sampler, logits_processors=make_logits_processors(params, len(prompt))):
            yield token

    @staticmethod
    def to_numpy(x: mx.array) -> np.ndarray:
        return np.array(x.astype(mx.float32))
