"""Convert the original checkpoint into an MLX model folder: a chosen float dtype, optional quantization."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import ModelArgs
from .files import check_output_folder, same_or_inside, staged_folder
from .hub import resolve_model_path
from .progress import Progress
from .weights import CONVERTED_FORMAT

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "processor_config.json")
MAX_SHARD_BYTES = 5 * 1024**3


@dataclass
class ConvertReport:
    """What a conversion wrote."""

    path: Path
    files: list[str]
    bytes: int
    dtype: str
    quantization: dict | None


def _quantization_text(quantization: dict | None) -> str:
    if not quantization:
        return "not quantized"
    group = f"group size {quantization['group_size']}"
    if quantization.get("recipe"):
        bits = ", ".join(f"{k} {v}-bit" for k, v in quantization["policy"].items() if v)
        return f"{quantization['recipe']} mixed-precision quantization ({bits}; {group})"
    return f"{quantization['bits']}-bit {quantization['mode']} quantization, {group}"


def _model_card(src: str, dtype: str, quantization: dict | None) -> str:
    q = _quantization_text(quantization)
    vision = bool(quantization and quantization.get("policy", {}).get("vision"))
    floats = "The projector, router and norms" if vision else "The vision towers, projector, router and norms"
    return (
        "---\nlibrary_name: mlx\npipeline_tag: image-text-to-text\ntags: [mlx, ocr, deepseek-ocr, dsocr-mlx]\n"
        f"base_model: deepseek-ai/DeepSeek-OCR\n---\n\n# DeepSeek-OCR for MLX ({dtype}, {q})\n\n"
        f"Converted from `{src}` with [dsocr-mlx](https://pypi.org/project/dsocr-mlx/) (`dsocr convert`).\n"
        f"{floats} stay in floating point.\n\n"
        '```python\nimport dsocr_mlx\nmodel = dsocr_mlx.load("PATH_OR_REPO")\n'
        'print(model.ocr("page.png").text)\n```\n'
    )


def _is_conversion(folder: Path) -> bool:
    try:
        return "dsocr_format" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def convert(
    src: str | Path,
    dst: str | Path,
    dtype: str = "float16",
    q_bits: int | None = None,
    q_group_size: int = 64,
    q_mode: str = "affine",
    q_policy: dict | None = None,
    overwrite: bool = False,
    upload_repo: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    show_progress: bool | None = None,
    q_recipe: str | None = None,
) -> ConvertReport:
    """Convert ``src`` (HF repo id or local folder, original layout) into an MLX folder at ``dst``.

    Args:
        src: ``deepseek-ai/DeepSeek-OCR`` or a local folder (the original layout, or an mlx-vlm conversion).
        dst: the folder to write; refused if it exists unless ``overwrite``, and if it is, is inside or
            contains ``src``. It is written aside and replaces an existing folder only when complete.
        dtype: ``float16`` (default: the most precise half type for long greedy decodes), ``bfloat16``
            or ``float32``.
        q_bits: quantize with this many bits (2, 3, 4, 5, 6 or 8); None keeps floats.
        q_group_size: quantization group size (16, 32, 64 or 128).
        q_mode: ``affine``, ``mxfp4``, ``mxfp8`` or ``nvfp4``.
        q_policy: overrides of which modules to quantize (keys of ``QuantPolicy``: ``attention``, ``mlp``,
            ``experts``, ``lm_head``, ``embed_tokens``, ``vision``): True (at ``q_bits``, or at a recipe's bits
            for the kind), a number of bits, or False (kept float).
        q_recipe: a mixed-precision recipe instead of ``q_bits``: ``mixed_2_6``, ``mixed_3_4``, ``mixed_3_5``,
            ``mixed_3_6``, ``mixed_3_8``, ``mixed_4_6`` or ``mixed_4_8`` (``mixed_LOW_HIGH``: routed experts at
            LOW bits; attention, shared experts, dense MLP and lm_head at HIGH bits). Each quantized module's
            bits are recorded in ``config.json``, so the folder loads without flags.
        upload_repo: after writing, upload the folder to this Hugging Face repo.
        max_shard_bytes: the largest safetensors shard.
        show_progress: draw a progress bar (default: when stderr is a terminal).
    """
    from .backends import check_dtype, get_backend

    check_dtype(dtype)
    get_backend("mlx")
    from .backends.mlx.convert import converted_tensors, tensor_count, write_shards
    from .backends.mlx.model import Model
    from .backends.mlx.quantize import KINDS, QuantPolicy, quantized_modules, recipe_policy

    policy = None
    unknown = set(q_policy or {}) - set(KINDS)
    if unknown and (q_bits is not None or q_recipe is not None):
        raise ValueError(f"unknown quantization policy key(s) {sorted(unknown)}")
    if q_recipe is not None:
        if q_bits is not None:
            raise ValueError(f"give q_bits or the recipe {q_recipe}, not both: the recipe sets the bits per layer kind")
        policy = recipe_policy(q_recipe, q_group_size, q_mode, q_policy)
    elif q_bits is not None:
        policy = QuantPolicy(bits=q_bits, group_size=q_group_size, mode=q_mode, **(q_policy or {}))
    # The source is found and read before anything is written; the output is written aside and
    # replaces DST only when complete.
    folder = resolve_model_path(src)
    dst = Path(dst).expanduser()
    if same_or_inside(dst, folder) or same_or_inside(folder, dst):
        raise ValueError(f"the output {dst} is, or is inside, or contains the source {folder}: choose another folder")
    check_output_folder(dst, overwrite)
    if dst.is_dir() and any(dst.iterdir()) and not _is_conversion(dst):
        raise FileExistsError(
            f"{dst} is not empty and is not an earlier `dsocr convert` output, so overwrite does not replace it: "
            "choose a new or empty folder"
        )
    config_path = folder / "config.json"
    args = ModelArgs.from_file(config_path)
    raw_config = json.loads(config_path.read_text())
    total = tensor_count(folder, args, policy)
    with staged_folder(dst, overwrite) as out:
        label = f"converting to {dtype}" + (f" {q_recipe}" if q_recipe else f" q{q_bits}" if q_bits else "")
        with Progress(total, label, enabled=show_progress) as bar:
            files = write_shards(converted_tensors(folder, args, dtype, policy), out, max_shard_bytes, bar.update)
        raw_config["dsocr_format"] = CONVERTED_FORMAT
        raw_config["dsocr_dtype"] = dtype
        raw_config.pop("quantization", None)
        if policy is not None:
            raw_config["quantization"] = policy.config(quantized_modules(Model(args), policy))
        (out / "config.json").write_text(json.dumps(raw_config, indent=1, ensure_ascii=False))
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copy(folder / name, out / name)
        (out / "README.md").write_text(_model_card(str(src), dtype, raw_config.get("quantization")))
    size = sum(p.stat().st_size for p in dst.iterdir() if p.is_file())
    if upload_repo:
        upload(dst, upload_repo)
    return ConvertReport(dst, files, size, dtype, raw_config.get("quantization"))


def dequantize(
    src: str | Path,
    dst: str | Path,
    dtype: str = "float16",
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    show_progress: bool | None = None,
) -> ConvertReport:
    """Write a quantized ``dsocr convert`` folder back in floating point (``dtype``): each quantized layer
    becomes ``mx.dequantize`` of its packed weight, scales and biases (with its own bits and group size
    where ``config.json`` gives a layer its own, as mlx-lm's mixed recipes do); other tensors are cast.

    ``dst`` is checked and written as by :func:`convert`.

    Raises:
        ValueError: ``src`` is not a quantized ``dsocr convert`` folder, or ``dst`` is, is inside or holds it.
        FileExistsError: ``dst`` exists and is not an earlier conversion, or not ``overwrite``.
    """
    from .backends import check_dtype, get_backend

    check_dtype(dtype)
    get_backend("mlx")
    import mlx.core as mx

    from .backends.mlx import DTYPES
    from .backends.mlx.convert import write_shards
    from .weights import weight_files

    folder = resolve_model_path(src)
    dst = Path(dst).expanduser()
    raw_config = json.loads((folder / "config.json").read_text())
    quantization = raw_config.get("quantization")
    if not raw_config.get("dsocr_format") or not isinstance(quantization, dict):
        raise ValueError(f"{folder} is not a quantized `dsocr convert` folder: there is nothing to dequantize")
    if same_or_inside(dst, folder) or same_or_inside(folder, dst):
        raise ValueError(f"the output {dst} is, or is inside, or contains the source {folder}: choose another folder")
    check_output_folder(dst, overwrite)
    if dst.is_dir() and any(dst.iterdir()) and not _is_conversion(dst):
        raise FileExistsError(f"{dst} is not empty and is not an earlier `dsocr convert` output: choose another folder")
    weights = {}
    for f in weight_files(folder):
        weights.update(mx.load(str(f)))
    packed = {k[: -len(".scales")] for k in weights if k.endswith(".scales")}

    def tensors():
        for key in sorted(weights):
            path, leaf = key.rsplit(".", 1)
            if path in packed and leaf in ("scales", "biases"):
                continue
            value = weights[key]
            if path in packed and leaf == "weight":
                own = quantization.get(path)
                q = own if isinstance(own, dict) else quantization
                value = mx.dequantize(
                    value,
                    weights[f"{path}.scales"],
                    weights.get(f"{path}.biases"),
                    group_size=q.get("group_size", 64),
                    bits=q.get("bits", 4),
                    mode=q.get("mode", "affine"),
                    dtype=DTYPES[dtype],
                )
            elif mx.issubdtype(value.dtype, mx.floating):
                value = value.astype(DTYPES[dtype])
            yield key, value

    total = sum(1 for k in weights if not (k.endswith((".scales", ".biases")) and k.rsplit(".", 1)[0] in packed))
    with staged_folder(dst, overwrite) as out:
        with Progress(total, f"dequantizing to {dtype}", enabled=show_progress) as bar:
            files = write_shards(tensors(), out, max_shard_bytes, bar.update)
        raw_config.pop("quantization")
        raw_config["dsocr_dtype"] = dtype
        (out / "config.json").write_text(json.dumps(raw_config, indent=1, ensure_ascii=False))
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copy(folder / name, out / name)
        (out / "README.md").write_text(_model_card(str(src), dtype, None))
    size = sum(p.stat().st_size for p in dst.iterdir() if p.is_file())
    return ConvertReport(dst, files, size, dtype, None)


def upload(folder: Path, repo_id: str) -> None:
    """Upload a converted folder to a Hugging Face model repo (created if missing)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id)
    except OfflineModeIsEnabled:
        raise ConnectionError(
            f"cannot upload to {repo_id}: HF_HUB_OFFLINE is set; unset it and retry "
            f"(the converted folder is kept at {folder})"
        ) from None
    except Exception as e:  # noqa: BLE001 - any network or hub failure becomes one clear message
        raise ConnectionError(
            f"upload to {repo_id} failed ({type(e).__name__}: {e}); check the network and "
            f"HF_TOKEN, then retry (the converted folder is kept at {folder})"
        ) from None
