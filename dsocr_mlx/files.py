"""Outputs written aside and put in place when complete: nothing is deleted before its replacement exists.

An interrupted run (Ctrl-C, an error, a full disk) leaves what was there before, never half a result.
A run killed outright (SIGKILL, power loss) can leave a hidden ``.NAME.partial-PID-*`` folder beside
the output; a later run removes it once process PID is gone (never another live run's).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

PARTIAL = ".partial-"
OLD = ".old-"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (assumed so where it cannot be told, and for other users')."""
    if pid == os.getpid():
        return True
    if sys.platform == "win32":  # os.kill(pid, 0) sends CTRL_C_EVENT there: assume alive, keep the folder
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _remove_leftovers(parent: Path, name: str) -> None:
    """Remove the hidden staging and old folders of ``name`` whose owning process is gone."""
    for kind in (PARTIAL, OLD):
        for stale in parent.glob(glob.escape(f".{name}{kind}") + "*"):
            pid = stale.name[len(f".{name}{kind}") :].split("-", 1)[0]
            if pid.isdigit() and not process_alive(int(pid)) and not stale.is_symlink():
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)


def _hidden(parent: Path, name: str, kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{name}{kind}{os.getpid()}-", dir=parent))


def check_output_folder(dst: Path, overwrite: bool) -> None:
    """Refuse an output that is a symlink or a file, or a non-empty folder without ``overwrite``."""
    if dst.is_symlink():
        raise FileExistsError(f"{dst} is a symbolic link: name the folder it points to, or another folder")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} is a file, not a folder: choose another output folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; pass overwrite to replace it")


@contextlib.contextmanager
def staged_folder(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A new empty folder beside ``dst`` to write into; when the block ends without an error it replaces
    ``dst`` (the old one is removed only then). On an error or an interrupt it is removed and ``dst`` is
    left as it was. If the final rename fails, the old ``dst`` is put back and the finished output is
    kept where it was written, named in the error.

    Raises:
        FileExistsError: ``dst`` is a symlink or a file, or a non-empty folder and not ``overwrite``.
    """
    dst = Path(dst)
    check_output_folder(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(dst.parent, dst.name)
    staged = _hidden(dst.parent, dst.name, PARTIAL)
    try:
        yield staged
        check_output_folder(dst, overwrite)  # something may have appeared there meanwhile
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    old = None
    if dst.exists():
        old = _hidden(dst.parent, dst.name, OLD) / "replaced"
        dst.rename(old)
    try:
        staged.rename(dst)
    except OSError as e:
        if old is not None:
            old.rename(dst)
        raise OSError(f"could not put the output in place at {dst} ({e}); it is complete in {staged}") from None
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


@contextlib.contextmanager
def staged_files(out: str | Path, last: str) -> Iterator[Path]:
    """A hidden folder inside ``out`` to write files into; when the block ends without an error each file
    is moved to the same place under ``out`` (each move is atomic), ``last`` (the file that says the
    result is complete) at the very end, after an old ``last`` was removed. Other files in ``out`` are
    kept. On an error or an interrupt nothing is moved and the staged files are removed.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder: choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    name = Path(last).stem
    _remove_leftovers(out, name)
    staged = _hidden(out, name, PARTIAL)
    try:
        yield staged
        files = sorted((p for p in staged.rglob("*") if p.is_file()), key=lambda p: p.relative_to(staged) == Path(last))
        (out / last).unlink(missing_ok=True)  # an interrupted move must not leave the old marker with new files
        for path in files:
            target = out / path.relative_to(staged)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """A hidden file name beside ``path`` to write into; when the block ends without an error it replaces
    ``path`` in one atomic rename. On an error or an interrupt it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path.parent, path.name)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL}{os.getpid()}-", dir=path.parent)
    os.close(fd)
    staged = Path(name)
    try:
        yield staged
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)


def same_or_inside(path: Path, other: Path) -> bool:
    """Whether ``path`` is ``other`` or lies inside it, judged by file identity where they exist (so
    ``./Model`` and ``./model`` are one folder on a case-insensitive disk), else by resolved names."""
    path, other = Path(path).expanduser().absolute(), Path(other).expanduser().absolute()
    if other.exists():
        target = other.stat()
        for candidate in (path, *path.parents):
            if candidate.exists() and os.path.samestat(candidate.stat(), target):
                return True
        return False
    resolved, other = path.resolve(), other.resolve()
    return resolved == other or other in resolved.parents
