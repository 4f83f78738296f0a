"""The MLX backend: strict, lazy checkpoint loading and the runtime the pipeline drives."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ...config import ModelArgs
from ...weights import (
    check_checkpoint,
    checkpoint_layout,
    checkpoint_shapes,
    from_transformers_shapes,
    from_transformers_tensors,
    safetensors_shapes,
    weight_files,
)
from ..runtime import RuntimeBase
from . import generate
from .model import Model
from .quantize import quantize_like

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


# mlx-vlm's deepseekocr_2 names for DeepSeek-OCR-2's Qwen2 encoder (checked before its CLIP rule).
_MLX_VLM_QWEN2 = (
    ("vision_model.qwen2_encoder.layers.", "model.qwen2_model.model.model.layers."),
    ("vision_model.qwen2_encoder.norm.", "model.qwen2_model.model.model.norm."),
)


def from_mlx_vlm(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Rename an mlx-vlm DeepSeek-OCR or DeepSeek-OCR-2 checkpoint to our keys; its convs are already
    channels-last and its experts stacked, as ours."""
    out = {}
    for key, value in weights.items():
        renamed = next((new + key[len(old) :] for old, new in _MLX_VLM_QWEN2 if key.startswith(old)), None)
        if renamed:
            key = renamed
        elif key.startswith("vision_model.qwen2_encoder.query_"):
            key = "model.qwen2_model." + key[len("vision_model.qwen2_encoder.") :] + ".weight"
        elif key.startswith("language_model.lm_head."):
            key = key[len("language_model.") :]
        elif key.startswith("language_model.model."):
            key = "model." + key[len("language_model.model.") :].replace(".mlp.switch_mlp.", ".mlp.experts.")
        elif key.startswith(("vision_model.", "sam_model.", "projector.", "image_newline")):
            key = "model." + key
        elif key == "view_separator":
            key = "model.view_seperator"
        elif key.endswith("position_ids"):
            continue
        out[key] = value
    return out


def check_parameters(model: Model, weights: dict[str, mx.array], source: str) -> None:
    """Every parameter filled with the right shape, no tensor left over: else name the offenders."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    check_checkpoint(found, expected, source)


def float_dtype(key: str, value: mx.array, dtype: mx.Dtype, cpu_float32_experts: bool) -> mx.array:
    """Cast float tensors to ``dtype``; packed quantized weights keep their integer type."""
    if not mx.issubdtype(value.dtype, mx.floating):
        return value
    if cpu_float32_experts and ".mlp.experts." in key and key.endswith(".weight"):
        # MLX's CPU backend runs gathered float matmuls in float32 only.
        return value.astype(mx.float32)
    return value.astype(dtype)


def load_model(folder: str | Path, args: ModelArgs, dtype: str = "float16", for_runtime: bool = True) -> Model:
    """Build the model from ``args`` and fill it strictly from the weights in ``folder`` (any known layout).

    Tensors are read lazily and materialised one by one, so peak memory stays close to the weights in
    ``dtype``. Quantized folders are quantized exactly where their checkpoint has scales.
    """
    files = weight_files(folder)
    names = safetensors_shapes(files)
    layout = checkpoint_layout(args, set(names))
    source = f"the checkpoint in {folder}"
    if layout == "transformers":
        names = from_transformers_shapes(names)
    if layout in ("hf", "transformers"):
        check_checkpoint(names, checkpoint_shapes(args), source)
    weights = {}
    for f in files:
        weights.update(mx.load(str(f)))
    if layout == "transformers":
        weights = dict(from_transformers_tensors(weights.items()))
    if layout in ("hf", "transformers"):
        weights = Model.sanitize(weights)
    elif layout == "mlx-vlm":
        weights = from_mlx_vlm(weights)
    model = Model(args)
    if args.quantization:
        quantize_like(model, args.quantization, weights)
    check_parameters(model, weights, source)
    cpu_experts = for_runtime and mx.default_device() == mx.cpu
    target = DTYPES[dtype]
    model.load_weights([(k, float_dtype(k, v, target, cpu_experts)) for k, v in weights.items()], strict=True)
    del weights
    # Materialise tensor by tensor so each source is read, cast and released before the next.
    for _, value in tree_flatten(model.parameters()):
        mx.eval(value)
    model.eval()
    return model


def resolve_device(device: str | None) -> str:
    """``gpu`` (Metal) or ``cpu``, the device MLX runs on here; naming another one is an error."""
    current = "gpu" if mx.default_device() == mx.gpu else "cpu"
    if device in (None, "auto", current):
        return current
    raise ValueError(
        f"the MLX backend runs on this machine's {current}, not {device!r}: devices such as cpu, "
        "cuda or cuda:N are the PyTorch backend's (--backend torch)"
    )


def default_dtype(args: ModelArgs, device: str) -> str:
    """The dtype a converted float folder was written in; else float16 on the GPU and float32 on MLX's CPU
    backend, whose half-precision matmuls are many times slower. Quantized folders compute in float32 on
    the CPU (half-precision quantized matmul is ~50x slower there, and upcasting the scales is lossless)."""
    if device == "cpu" and (args.quantization or not args.converted_dtype):
        return "float32"
    return args.converted_dtype or "float16"


class Runtime(RuntimeBase):
    """The MLX runtime (the pipeline's contract: :class:`~dsocr_mlx.backends.runtime.Runtime`)."""

    name = "mlx"
    generation = generate

    @classmethod
    def load(cls, folder: str | Path, args: ModelArgs, dtype: str, device: str | None = None) -> Runtime:
        return cls(load_model(folder, args, dtype), dtype, resolve_device(device))

    def token_column(self, tokens: list[mx.array]) -> mx.array:
        return mx.concatenate([t.reshape(1, 1) for t in tokens]).astype(mx.int32)

    def launch(self, *arrays: mx.array) -> None:
        mx.async_eval(*arrays)

    def read_tokens(self, column: mx.array) -> list[int]:
        return column.reshape(-1).tolist()

    def pixels(self, array: np.ndarray) -> mx.array:
        # The one place where NCHW pixels become MLX's NHWC.
        return mx.array(array.transpose(0, 2, 3, 1)).astype(DTYPES[self.dtype])

    def token_ids(self, ids: np.ndarray) -> mx.array:
        return mx.array(ids.astype(np.int32))

    def evaluate(self, x: mx.array) -> mx.array:
        mx.eval(x)
        return x

    def to_numpy(self, x: mx.array) -> np.ndarray:
        return np.array(x.astype(mx.float32))
