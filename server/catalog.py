"""The models a server offers: their ids, the other names clients use for them, and what they are.

A configured model answers to its id (its folder's name, or its repo id), to the path or repo id it was
configured with, to the Hugging Face repo id its folder came from (``config.json``'s ``_name_or_path``, or
the hub cache folder it sits in), to its family's name (``deepseek-ocr``, ``deepseek-ocr-2``), to the
configured ``aliases``, and, for Ollama clients, to any of these with a ``:latest`` tag. Names compare
without regard to case. With ``accept_any_model`` and one model, every name is that model.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsocr_mlx.config import ModelArgs
from dsocr_mlx.hub import REPO_ID
from dsocr_mlx.modes import OCR1

HUB_FOLDER = re.compile(r"^models--([^/]+?)--(.+)$")  # huggingface_hub's cache: models--owner--name


def model_id(path: str) -> str:
    """The id a configured model is served under: its folder's name, or the repo id."""
    return Path(path).name if Path(path).is_dir() else path


@dataclass
class ModelEntry:
    """One configured model: its id, where it is, and what its config.json says (when it is on disk)."""

    id: str
    path: str
    names: set[str] = field(default_factory=set)
    family: str | None = None
    repo_id: str | None = None
    quantization: str | None = None
    parameters: int | None = None
    size: int = 0
    modified: float = 0.0

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.id}\0{self.path}\0{self.modified}".encode()).hexdigest()


def _describe(entry: ModelEntry) -> None:
    """Fill in what the folder tells (a repo id not downloaded yet tells nothing until it is)."""
    folder = Path(entry.path).expanduser()
    if not folder.is_dir():
        return
    for parent in (folder, *folder.parents):
        if m := HUB_FOLDER.match(parent.name):
            entry.repo_id = f"{m.group(1)}/{m.group(2)}"
            break
    try:
        config = json.loads((folder / "config.json").read_text())
        args = ModelArgs.from_dict(config)
    except (OSError, ValueError, TypeError, AttributeError):
        return
    name = config.get("_name_or_path")
    if isinstance(name, str) and REPO_ID.match(name):
        entry.repo_id = entry.repo_id or name
    entry.family = args.family
    q = args.quantization
    entry.quantization = f"Q{q.get('bits')}" if isinstance(q, dict) else (args.converted_dtype or "BF16").upper()
    from dsocr_mlx.weights import checkpoint_shapes

    entry.parameters = sum(int(_prod(s)) for s in checkpoint_shapes(args).values())
    files = list(folder.glob("*.safetensors"))
    entry.size = sum(f.stat().st_size for f in files)
    entry.modified = max((f.stat().st_mtime for f in [folder / "config.json", *files]), default=0.0)


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


class ModelCatalog:
    """The configured models by id, and the resolution of the names clients send."""

    def __init__(self, models: dict[str, str], default: str, aliases: list[str] = (), accept_any: bool = False):
        self.entries = {name: ModelEntry(name, path) for name, path in models.items()}
        self.default, self.accept_any = default, accept_any and len(models) == 1
        for entry in self.entries.values():
            _describe(entry)
        families_taken: set[str] = set()
        # The default model first: it gets the family name when two models share a family.
        for entry in sorted(self.entries.values(), key=lambda e: e.id != default):
            entry.names = {entry.id, entry.path, Path(entry.path).name}
            if entry.repo_id:
                entry.names.add(entry.repo_id)
            if entry.family and entry.family not in families_taken:
                families_taken.add(entry.family)
                entry.names.add(entry.family)
            if entry.id == default:
                entry.names.update(aliases)
        self._index: dict[str, str] = {}
        for entry in self.entries.values():
            for name in entry.names:
                self._index.setdefault(name.lower(), entry.id)

    def resolve(self, name: str | None) -> str | None:
        """The id of the model ``name`` means (None: the default), or None when no model has that name."""
        if not name:
            return self.default
        key = name.strip().lower()
        for candidate in (key, key.removesuffix(":latest")):
            if candidate in self._index:
                return self._index[candidate]
        return self.default if self.accept_any else None

    def family_name(self, entry: ModelEntry) -> str:
        return (entry.family or OCR1).replace("-", "_")

    def openai_model(self, entry: ModelEntry, loaded: bool) -> dict[str, Any]:
        """A ``GET /v1/models`` entry: OpenAI's fields plus whether it is in memory and its other names."""
        return {
            "id": entry.id,
            "object": "model",
            "created": int(entry.modified),
            "owned_by": "dsocr-mlx",
            "state": "loaded" if loaded else "idle",
            "aliases": sorted(n for n in entry.names if n != entry.id),
        }
