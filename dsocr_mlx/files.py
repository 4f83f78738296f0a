"""Outputs written aside and put in place when complete: nothing is deleted before its replacement exists.

An interrupted run (Ctrl-C, an error, a full disk) leaves what was there before, never half a result.
A run killed outright (SIGKILL, power loss) can leave a hidden ``.NAME.partial-*`` folder beside the
output, which the next run of the same output removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

PARTIAL = ".partial-"


def _remove_leftovers(parent: Path, name: str) -> None:
    for stale in parent.glob(f".{name}{PARTIAL}*"):
        shutil.rmtree(stale, ignore_errors=True)


def check_output_folder(dst: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, or a non-empty folder without ``overwrite``."""
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} is a file, not a folder: choose another output folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; pass overwrite to replace it")


@contextlib.contextmanager
def staged_folder(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A new empty folder beside ``dst`` to write into; when the block ends without an error it replaces
    ``dst`` (the old one is removed only then). On an error or an interrupt it is removed and ``dst`` is
    left as it was.

    Raises:
        FileExistsError: ``dst`` is a file, or a non-empty folder and not ``overwrite``.
    """
    dst = Path(dst)
    check_output_folder(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(dst.parent, dst.name)
    staged = Path(tempfile.mkdtemp(prefix=f".{dst.name}{PARTIAL}", dir=dst.parent))
    try:
        yield staged
        check_output_folder(dst, overwrite)  # something may have appeared there meanwhile
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}") if dst.exists() else None
        if old is not None:
            dst.rename(old)
        staged.rename(dst)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_files(out: str | Path, last: str) -> Iterator[Path]:
    """A hidden folder inside ``out`` to write files into; when the block ends without an error each file
    is moved to the same place under ``out`` (each move is atomic), ``last`` (the file that says the
    result is complete) at the very end. Other files in ``out`` are kept. On an error or an interrupt
    nothing is moved and the staged files are removed.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder: choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out, "result")
    staged = Path(tempfile.mkdtemp(prefix=f".result{PARTIAL}", dir=out))
    try:
        yield staged
        files = sorted((p for p in staged.rglob("*") if p.is_file()), key=lambda p: p.relative_to(staged) == Path(last))
        for path in files:
            target = out / path.relative_to(staged)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def is_within(path: Path, other: Path) -> bool:
    """Whether ``path`` is ``other`` or lies inside it (both resolved)."""
    path, other = path.resolve(), other.resolve()
    return path == other or other in path.parents
