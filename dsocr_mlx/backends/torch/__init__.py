"""The PyTorch backend (CPU and CUDA): strict loading straight into the target dtype and device."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ...config import ModelArgs
from ...weights import (
    CONV_WEIGHTS,
    check_checkpoint,
    checkpoint_layout,
    checkpoint_shapes,
    from_transformers_shapes,
    from_transformers_tensors,
    read_safetensors_header,
    safetensors_shapes,
    weight_files,
)
from ..runtime import RuntimeBase
from . import generate
from .model import Model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of ``path`` as a CPU view of one reused scratch buffer: consume it before the next.

    Plain file reads into one buffer as large as the largest tensor: memory-mapping would keep every page
    read resident until the file closes (up to a whole 5 GB shard), and a buffer per tensor fragments
    the heap.
    """
    with open(path, "rb") as f:
        header_len, header = read_safetensors_header(f, path)
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        scratch = memoryview(bytearray(max((e - s for s, e in (i["data_offsets"] for _, i in entries)), default=0)))
        for name, info in entries:
            start, end = info["data_offsets"]
            f.seek(8 + header_len + start)
            raw = scratch[: end - start]
            if f.readinto(raw) != len(raw):
                raise ValueError(f"{path} is truncated at tensor {name}; re-download it")
            source = SAFETENSORS_DTYPES[info["dtype"]]
            tensor = torch.frombuffer(raw, dtype=source) if len(raw) else torch.empty(0, dtype=source)
            yield name, tensor.reshape(info["shape"])


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> str:
    """``device`` checked (``cpu``, ``cuda``, ``cuda:N``), or the default one for None/``auto``."""
    if device in (None, "auto"):
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        hint = "; on Apple Silicon use the MLX backend" if parsed.type == "mps" else ""
        raise ValueError(f"the PyTorch backend runs on cpu or cuda, not {device!r}{hint}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(
                f"device {device!r} asked for, but torch {torch.__version__} ({build}) sees no CUDA "
                "GPU; use --device cpu, or install a CUDA build of torch on a machine with a GPU"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return str(parsed)


def default_dtype(args: ModelArgs, device: str) -> str:
    """The dtype a converted folder was written in; else bfloat16 on CUDA (the official inference dtype)
    and float32 on the CPU, where half-precision matmuls are slower."""
    if args.converted_dtype:
        return args.converted_dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


def load_model(folder: str | Path, args: ModelArgs, dtype: str = "float32", device: str | None = None) -> Model:
    """Build the model on the meta device and fill it strictly, each tensor copied onto ``device`` in ``dtype``.

    Nothing is materialised twice: no float32 copy on the CPU before moving to the GPU, and no per-expert
    tensors beside the stacked ones (peak memory is the weights plus the largest single tensor).
    """
    device = resolve_device(device)
    files = weight_files(folder)
    names = safetensors_shapes(files)
    source = f"the checkpoint in {folder}"
    if args.quantization:
        raise ValueError(
            f"{folder} is quantized ({args.quantization.get('bits')}-bit), which only the MLX backend "
            "runs; use --backend mlx, or convert the original checkpoint to a float dtype"
        )
    layout = checkpoint_layout(args, set(names))
    converted = layout == "converted"
    if layout == "transformers":
        names = from_transformers_shapes(names)
    if layout == "mlx-vlm":
        raise ValueError(
            f"{folder} is an mlx-vlm conversion, which only the MLX backend reads; use --backend mlx "
            "or the original deepseek-ai/DeepSeek-OCR checkpoint"
        )
    if not converted:
        check_checkpoint(names, checkpoint_shapes(args), source)
    # The layout check runs on meta tensors; then every parameter is allocated once, in its dtype on its
    # device, and each checkpoint tensor is copied into its place (an expert into its row of the stack).
    sanitized = Model.sanitize({k: torch.empty(v, device="meta") for k, v in names.items()}, converted)
    with torch.device("meta"):
        model = Model(args).to(DTYPES[dtype])
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_checkpoint({k: tuple(v.shape) for k, v in sanitized.items()}, expected, source)
    model = model.to_empty(device=device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for f in files:
            tensors = read_safetensors(f)
            if layout == "transformers":
                tensors = from_transformers_tensors(tensors)
            for key, tensor in tensors:
                name, expert = Model.destination(key)
                if converted and key in CONV_WEIGHTS:
                    tensor = tensor.permute(0, 3, 1, 2)
                (params[name] if expert is None else params[name][expert]).copy_(tensor)
    return model.eval()


class Runtime(RuntimeBase):
    """The PyTorch runtime (the pipeline's contract: :class:`~dsocr_mlx.backends.runtime.Runtime`)."""

    name = "torch"
    generation = generate

    @classmethod
    def load(cls, folder: str | Path, args: ModelArgs, dtype: str, device: str | None = None) -> Runtime:
        device = resolve_device(device)
        return cls(load_model(folder, args, dtype, device), dtype, device)

    def token_column(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(1, 1).to(self.device) for t in tokens])

    def read_tokens(self, column: torch.Tensor) -> list[int]:
        return column.reshape(-1).tolist()

    def pixels(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, DTYPES[self.dtype])

    def token_ids(self, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(ids).to(self.device)

    def inference(self) -> torch.inference_mode:
        return torch.inference_mode()

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        return x.float().cpu().numpy()

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
