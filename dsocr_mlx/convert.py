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


def _model_card(src: str, dtype: str, quantization: dict | None) -> str:
    q = (
        "not quantized"
        if not quantization
        else (
            f"{quantization['bits']}-bit {quantization['mode']} quantization, group size {quantization['group_size']}"
        )
    )
    return (
        "---\nlibrary_name: mlx\npipeline_tag: image-text-to-text\ntags: [mlx, ocr, deepseek-ocr, dsocr-mlx]\n"
        f"base_model: deepseek-ai/DeepSeek-OCR\n---\n\n# DeepSeek-OCR for MLX ({dtype}, {q})\n\n"
        f"Converted from `{src}` with [dsocr-mlx](https://pypi.org/project/dsocr-mlx/) (`dsocr convert`).\n"
        "Vision towers, projector, router and norms stay in floating point.\n\n"
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
            ``experts``, ``lm_head``, ``embed_tokens``, ``vision``).
        upload_repo: after writing, upload the folder to this Hugging Face repo.
        max_shard_bytes: the largest safetensors shard.
        show_progress: draw a progress bar (default: when stderr is a terminal).
    """
    from .backends import check_dtype, get_backend

    check_dtype(dtype)
    get_backend("mlx")
    from .backends.mlx.convert import converted_tensors, tensor_count, write_shards
    from .backends.mlx.quantize import QuantPolicy

    policy = None
    if q_bits is not None:
        unknown = set(q_policy or {}) - {"attention", "mlp", "experts", "lm_head", "embed_tokens", "vision"}
        if unknown:
            raise ValueError(f"unknown quantization policy key(s) {sorted(unknown)}")
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
        label = f"converting to {dtype}" + (f" q{q_bits}" if q_bits else "")
        with Progress(total, label, enabled=show_progress) as bar:
            files = write_shards(converted_tensors(folder, args, dtype, policy), out, max_shard_bytes, bar.update)
        raw_config["dsocr_format"] = CONVERTED_FORMAT
        raw_config["dsocr_dtype"] = dtype
        raw_config.pop("quantization", None)
        if policy is not None:
            raw_config["quantization"] = policy.config()
        (out / "config.json").write_text(json.dumps(raw_config, indent=1, ensure_ascii=False))
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copy(folder / name, out / name)
        (out / "README.md").write_text(_model_card(str(src), dtype, raw_config.get("quantization")))
    size = sum(p.stat().st_size for p in dst.iterdir() if p.is_file())
    if upload_repo:
        upload(dst, upload_repo)
    return ConvertReport(dst, files, size, dtype, raw_config.get("quantization"))


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
