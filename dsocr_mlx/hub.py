"""Find a model folder: a local path, or a Hugging Face repo id fetched through huggingface_hub."""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_MODEL = "deepseek-ai/DeepSeek-OCR"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what loading needs: no remote code, no duplicate .bin weights.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.md", "tokenizer*"]


def resolve_model_path(path_or_repo: str | Path) -> Path:
    """A local folder as is; otherwise download (or reuse the cache of) a Hugging Face repo.

    Raises a ``FileNotFoundError`` that says how to pass a local folder when the hub is unreachable.
    """
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file: pass the model folder that holds config.json and the weights")
        return path
    name = str(path_or_repo)
    if not REPO_ID.match(name):
        raise FileNotFoundError(f"model folder {name} not found, and it is not a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(name, allow_patterns=ALLOW_PATTERNS))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise FileNotFoundError(
            f"Hugging Face repo {name} not found or not accessible ({type(e).__name__}); "
            "check the name, or set HF_TOKEN for a private repo"
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise FileNotFoundError(
            f"could not download {name}: the Hugging Face hub is unreachable or offline and the model is not in "
            f"the local cache ({type(e).__name__}). Download it elsewhere (huggingface-cli download {name}) "
            "and pass the local folder instead of the repo id."
        ) from None


def describe_folder(folder: Path) -> str | None:
    """The model and format of a DeepSeek-OCR or DeepSeek-OCR-2 folder, or None when it is not one."""
    import json

    from .config import ModelArgs, is_transformers_config

    try:
        config = json.loads((folder / "config.json").read_text())
        args = ModelArgs.from_dict(config)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    known = ("deepseek_vl_v2", "deepseekocr", "deepseekocr_2", "deepseek_ocr2")
    if config.get("model_type") not in known and "projector_config" not in config:
        return None
    q = config.get("quantization")
    qtext = f", {q.get('bits')}-bit {q.get('mode', 'affine')}" if isinstance(q, dict) else ""
    if config.get("dsocr_format"):
        kind = f"dsocr-mlx ({config.get('dsocr_dtype', '?')}{qtext})"
    elif is_transformers_config(config):
        kind = "transformers"
    elif "text_config" in config or config.get("model_type", "").startswith("deepseekocr"):
        kind = f"mlx-vlm{qtext or ' (float)'}"
    else:
        kind = "original (bf16)"
    return f"{args.family_name}, {kind}"


def hub_cache_dir() -> Path:
    """The huggingface_hub cache folder, read from the environment now (``HF_HUB_CACHE``, ``HF_HOME``)."""
    import os

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def list_cached_models() -> list[tuple[str, str, Path, int]]:
    """DeepSeek-OCR models in the huggingface_hub cache: ``(repo id, format, snapshot folder, bytes)``."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(hub_cache_dir())
    except CacheNotFound:
        return []
    found = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)[:1]:
            kind = describe_folder(Path(revision.snapshot_path))
            if kind:
                found.append((repo.repo_id, kind, Path(revision.snapshot_path), revision.size_on_disk))
    return found
