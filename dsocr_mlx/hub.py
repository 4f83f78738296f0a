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
        raise FileNotFoundError(f"Hugging Face repo {name} not found or not accessible ({type(e).__name__}); "
                                "check the name, or set HF_TOKEN for a private repo") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise FileNotFoundError(
            f"could not download {name}: the Hugging Face hub is unreachable or offline and the model is not in "
            f"the local cache ({type(e).__name__}). Download it elsewhere (huggingface-cli download {name}) "
            "and pass the local folder instead of the repo id."
        ) from None
