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
from .quantize import quantize_like

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


# Written into config.json by our converter: the weights are already in this backend's layout.
CONVERTED_FORMAT = "dsocr-mlx/1"


def detect_layout(args: ModelArgs, names: set[str]) -> str:
    """``"hf"`` (original checkpoint), ``"converted"`` (ours) or ``"mlx-vlm"`` (mlx-community conversions)."""
    if args.converted_format == CONVERTED_FORMAT:
        return "converted"
    if args.converted_format:
        raise ValueError(f"config.json names the format {args.converted_format!r}, which this version cannot read "
                         f"(it reads {CONVERTED_FORMAT}); upgrade dsocr-mlx or re-convert the model")
    if any(n.startswith("language_model.") for n in names):
        return "mlx-vlm"
    if "lm_head.weight" in names or any(n.startswith("model.") for n in names):
        return "hf"
    sample = ", ".join(sorted(names)[:3]) or "no tensors"
    raise ValueError(f"unknown checkpoint layout (found {sample}): expected the original deepseek-ai/DeepSeek-OCR "
                     "layout, a folder written by `dsocr convert`, or an mlx-vlm conversion")


def from_mlx_vlm(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Rename an mlx-vlm DeepSeek-OCR checkpoint to our keys; its convs are already channels-last."""
    out = {}
    for key, value in weights.items():
        if key.startswith("language_model.lm_head."):
            key = key[len("language_model."):]
        elif key.startswith("language_model.model."):
            key = "model." + key[len("language_model.model."):].replace(".mlp.switch_mlp.", ".mlp.experts.")
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
    layout = detect_layout(args, set(names))
    source = f"the checkpoint in {folder}"
    if layout == "hf":
        check_checkpoint(names, checkpoint_shapes(args), source)
    weights = {}
    for f in files:
        weights.update(mx.load(str(f)))
    if layout == "hf":
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
    raise ValueError(f"the MLX backend runs on this machine's {current}, not {device!r}: devices such as cpu, "
                     "cuda or cuda:N are the PyTorch backend's (--backend torch)")


def default_dtype(args: ModelArgs, device: str) -> str:
    """The dtype a converted float folder was written in; else float16 on the GPU and float32 on MLX's CPU
    backend, whose half-precision matmuls are many times slower. Quantized folders compute in float32 on
    the CPU (half-precision quantized matmul is ~50x slower there, and upcasting the scales is lossless)."""
    if device == "cpu" and (args.quantization or not args.converted_dtype):
        return "float32"
    return args.converted_dtype or "float16"


class Runtime:
    """What the backend-neutral pipeline calls: vision, prefill logits and token generation."""

    name = "mlx"

    def __init__(self, model: Model, dtype: str):
        self.model = model
        self.dtype = dtype
        self.device = resolve_device(None)

    @classmethod
    def load(cls, folder: str | Path, args: ModelArgs, dtype: str, device: str | None = None) -> Runtime:
        resolve_device(device)
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
