"""Stream a checkpoint into the MLX layout, tensor by tensor: cast, optionally quantize, write shards.

Peak memory is about one shard plus the tensor at hand, whatever the model size, because no model is
materialised: a parameter-free skeleton only tells which modules the quantization policy selects.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ...config import ModelArgs
from ...weights import check_checkpoint, checkpoint_layout, checkpoint_shapes, safetensors_shapes, weight_files
from . import DTYPES, from_mlx_vlm
from .model import Model
from .quantize import QuantPolicy, quant_predicate


def converted_tensors(
    folder: Path, args: ModelArgs, dtype: str, policy: QuantPolicy | None
) -> Iterator[tuple[str, mx.array]]:
    """Yield ``(key, lazy array)`` of the converted checkpoint in a stable order."""
    files = weight_files(folder)
    names = safetensors_shapes(files)
    layout = checkpoint_layout(args, set(names))
    if layout == "converted" or args.quantization:
        raise ValueError(
            f"{folder} is already converted{' and quantized' if args.quantization else ''}: "
            "convert from the original deepseek-ai/DeepSeek-OCR checkpoint instead"
        )
    if layout == "hf":
        check_checkpoint(names, checkpoint_shapes(args), f"the checkpoint in {folder}")
    weights = {}
    for f in files:
        weights.update(mx.load(str(f)))
    weights = Model.sanitize(weights) if layout == "hf" else from_mlx_vlm(weights)
    skeleton = Model(args)  # never evaluated: only module types and shapes are read
    modules = dict(skeleton.named_modules())
    expected = {k: tuple(v.shape) for k, v in tree_flatten(skeleton.parameters())}
    check_checkpoint({k: tuple(v.shape) for k, v in weights.items()}, expected, f"the checkpoint in {folder}")
    predicate = quant_predicate(policy) if policy else None
    target = DTYPES[dtype]
    for key in sorted(weights):
        value = weights.pop(key)
        if mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(target)
        path, leaf = key.rsplit(".", 1)
        params = predicate(path, modules[path]) if predicate and leaf == "weight" and path in modules else None
        if params:  # each module with its own bits (a mixed recipe), as quantized_modules records them
            q = mx.quantize(value, params["group_size"], params["bits"], mode=params["mode"])
            yield f"{path}.weight", q[0]
            yield f"{path}.scales", q[1]
            if len(q) > 2 and q[2] is not None:
                yield f"{path}.biases", q[2]
        else:
            yield key, value


def write_shards(
    tensors: Iterator[tuple[str, mx.array]],
    dst: Path,
    max_shard_bytes: int,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Write tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards (plus an index); returns file names."""
    shards: list[dict[str, mx.array]] = []
    current: dict[str, mx.array] = {}
    size = 0
    written: list[Path] = []

    def flush() -> None:
        nonlocal current, size
        if current:
            path = dst / f"shard-{len(written):05d}.safetensors"
            mx.save_safetensors(str(path), current, metadata={"format": "mlx"})
            written.append(path)
            shards.append({k: None for k in current})
        current, size = {}, 0

    for key, value in tensors:
        mx.eval(value)
        if current and size + value.nbytes > max_shard_bytes:
            flush()
        current[key] = value
        size += value.nbytes
        if progress is not None:
            progress(1)
    flush()
    names = []
    total = len(written)
    weight_map = {}
    for i, (path, keys) in enumerate(zip(written, shards)):
        name = "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        path.rename(dst / name)
        names.append(name)
        weight_map.update({k: name for k in keys})
    if total > 1:
        total_size = sum((dst / n).stat().st_size for n in names)
        (dst / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=1)
        )
    return names


def tensor_count(folder: Path, args: ModelArgs, policy: QuantPolicy | None) -> int:
    """How many tensors the conversion writes (for a progress bar)."""
    skeleton = Model(args)
    n = sum(1 for _ in tree_flatten(skeleton.parameters()))
    if policy is None:
        return n
    predicate = quant_predicate(policy)
    extra = 2 if policy.mode == "affine" else 1
    return n + extra * sum(1 for path, m in skeleton.named_modules() if path and predicate(path, m))


__all__ = ["converted_tensors", "tensor_count", "write_shards"]
