"""Find a model folder: a local path, or a Hugging Face repo id from the huggingface_hub cache, downloaded
(with a progress bar on a terminal) on first use or by ``dsocr pull``."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "deepseek-ai/DeepSeek-OCR"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what loading needs: no remote code, no duplicate .bin weights.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.md", "tokenizer*"]


def resolve_model_path(path_or_repo: str | Path, progress: bool | None = None) -> Path:
    """A local folder as is; otherwise a Hugging Face repo from the local cache, downloaded on first use.

    A repo already complete in the cache is used without asking the hub (``dsocr pull`` / :func:`download_model`
    updates it); a download shows a progress bar when ``progress`` (default: stderr is a terminal).

    Raises:
        FileNotFoundError: no such folder and not a repo id, or the repo cannot be reached or found; the
            message says what to do.
    """
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file: pass the model folder that holds config.json and the weights")
        return path
    name = str(path_or_repo)
    if not REPO_ID.match(name):
        raise FileNotFoundError(f"model folder {name} not found, and it is not a Hugging Face repo id (owner/name)")
    return cached_model(name) or download_model(name, progress=progress)


def _hub_download(repo_id: str, **kwargs: Any) -> str:
    """huggingface_hub's ``snapshot_download`` (one place, so tests can stand in for the hub)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, **kwargs)


def _complete(folder: Path) -> bool:
    """Whether a cached snapshot holds config.json and every weight file (an interrupted download does not)."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return False
        return all((folder / shard).is_file() for shard in shards)
    return any(folder.glob("*.safetensors"))


def cached_model(repo_id: str) -> Path | None:
    """The complete snapshot of ``repo_id`` in the huggingface_hub cache, or None; never asks the hub."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(_hub_download(repo_id, allow_patterns=ALLOW_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return folder if _complete(folder) else None


def _download_bar(show: bool) -> type:
    from huggingface_hub.utils import tqdm

    class DownloadBar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["disable"] = not show  # HF_HUB_DISABLE_PROGRESS_BARS still turns it off (in tqdm)
            super().__init__(*args, **kwargs)

    return DownloadBar


def download_model(repo_id: str, progress: bool | None = None, downloader: Callable[..., str] | None = None) -> Path:
    """Download (or bring up to date) ``repo_id``'s model files in the huggingface_hub cache; its folder.

    Args:
        repo_id: ``owner/name`` on the Hugging Face hub (``HF_HOME``, ``HF_TOKEN``, ``HF_HUB_OFFLINE`` apply).
        progress: draw download bars on stderr (default: when stderr is a terminal).
        downloader: stands in for ``huggingface_hub.snapshot_download`` (tests).

    Raises:
        FileNotFoundError: not a repo id, or the repo is missing or private, or the hub is unreachable and
            the model not cached; the message says what to do.
    """
    import sys

    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if not REPO_ID.match(repo_id):
        raise FileNotFoundError(f"{repo_id} is not a Hugging Face repo id (owner/name)")
    show = sys.stderr.isatty() if progress is None else progress
    try:
        folder = (downloader or _hub_download)(repo_id, allow_patterns=ALLOW_PATTERNS, tqdm_class=_download_bar(show))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise FileNotFoundError(
            f"Hugging Face repo {repo_id} not found or not accessible ({type(e).__name__}); "
            "check the name, or set HF_TOKEN for a private or gated repo"
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise FileNotFoundError(
            f"could not download {repo_id}: the Hugging Face hub is unreachable or offline and the model is not "
            f"in the local cache ({type(e).__name__}). Download it where the hub is reachable (`hf download "
            f"{repo_id}` or `dsocr pull`) and pass the local folder instead of the repo id; to try dsocr without "
            "the real weights, `dsocr make-test-model ./test-model` writes a small random model."
        ) from None
    return Path(folder)


def folder_size(folder: Path) -> int:
    """Bytes of the files in ``folder`` (links followed: a cache snapshot links to its blobs)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def describe_folder(folder: Path) -> str | None:
    """The model and format of a DeepSeek-OCR or DeepSeek-OCR-2 folder, or None when it is not one."""
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
