"""The web page's history: an SQLite index (standard library) over one folder of artefacts per entry.

An entry is written into a hidden staging folder, renamed into place, and only then inserted into the
index and committed: a crash at any point leaves nothing visible. On opening, staging folders of dead
processes and entry folders the index does not know are removed. Every path that comes from a URL is
checked against a strict pattern and resolved inside its entry's folder (no ``..``, no absolute path, no
backslash, no percent sign, no symbolic link). Every method blocks: call them off the event loop.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsocr_mlx.files import process_alive

logger = logging.getLogger("dsocr_server")

ENTRY_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: made by the server, never by a client
SAFE_PATH = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}(/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}){0,7}")
STAGING = ".staging-"  # .staging-PID-ID
ORPHAN_GRACE = 600.0  # seconds: an entry folder without its index row may be another server's, mid-commit

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    bytes INTEGER NOT NULL,
    summary TEXT NOT NULL,
    meta TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_created ON entries (created);
"""


class UnsafePath(ValueError):
    """A path from a URL that could leave its entry's folder (or is not one this server writes)."""


@dataclass
class Entry:
    """One history entry: its id, when it was made (``time.time()``), its size on disk and its metadata."""

    id: str
    created: float
    bytes: int
    meta: dict[str, Any]


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


class HistoryStore:
    """The history in ``folder``, keeping at most ``max_entries`` entries and ``max_bytes`` bytes
    (0: no limit; the newest entry is always kept). Opened on first use, so a server whose page is never
    used creates nothing on disk."""

    def __init__(
        self, folder: str | Path, max_entries: int = 0, max_bytes: int = 0, orphan_grace: float = ORPHAN_GRACE
    ):
        self.folder, self.max_entries, self.max_bytes = Path(folder).expanduser(), max_entries, max_bytes
        self.orphan_grace = orphan_grace
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        """The open index (call with the lock held): made, and leftovers swept, on first use."""
        if self._db is None:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            db = sqlite3.connect(self.folder / "history.sqlite3", check_same_thread=False, isolation_level=None)
            db.executescript(SCHEMA)
            self._db = db
            self._sweep()
        return self._db

    def _sweep(self) -> None:
        known = {row[0] for row in self._db.execute("SELECT id FROM entries")}
        now = time.time()
        for path in self.folder.iterdir():
            if path.is_symlink():
                continue
            if path.name.startswith(STAGING):
                pid = path.name[len(STAGING) :].split("-", 1)[0]
                if pid.isdigit() and not process_alive(int(pid)):
                    shutil.rmtree(path, ignore_errors=True)
            elif ENTRY_ID.fullmatch(path.name) and path.name not in known:
                if now - path.stat().st_mtime >= self.orphan_grace:
                    logger.info("removing history folder %s: no index entry (a commit was interrupted)", path)
                    shutil.rmtree(path, ignore_errors=True)

    def begin(self) -> tuple[str, Path]:
        """A new entry id and its empty staging folder, to write the entry's files into."""
        with self._lock:
            self._conn()
        entry_id = uuid.uuid4().hex
        staging = self.folder / f"{STAGING}{os.getpid()}-{entry_id}"
        staging.mkdir(mode=0o700)
        return entry_id, staging

    def commit(
        self, entry_id: str, staging: Path, meta: dict[str, Any], summary: dict[str, Any], created: float
    ) -> Entry:
        """Put a complete staging folder in place and make it visible; then apply the retention limits.

        ``summary`` is what :meth:`entries` lists (kept apart: a listing never reads every entry's texts).
        """
        size = folder_size(staging)
        with self._lock:
            db = self._conn()
            staging.rename(self.folder / entry_id)
            db.execute(
                "INSERT INTO entries (id, created, bytes, summary, meta) VALUES (?, ?, ?, ?, ?)",
                (
                    entry_id,
                    created,
                    size,
                    json.dumps(summary, ensure_ascii=False),
                    json.dumps(meta, ensure_ascii=False),
                ),
            )
            dropped = self._over_limits(db)
        for old in dropped:
            shutil.rmtree(self.folder / old, ignore_errors=True)
        return Entry(entry_id, created, size, meta)

    def _over_limits(self, db: sqlite3.Connection) -> list[str]:
        """Delete the oldest rows beyond the limits (never the newest); their folders go after the commit."""
        rows = db.execute("SELECT id, bytes FROM entries ORDER BY created DESC").fetchall()
        kept, total, dropped = 0, 0, []
        for entry_id, size in rows:
            full = (self.max_entries and kept >= self.max_entries) or (self.max_bytes and total + size > self.max_bytes)
            if full and kept:
                dropped.append(entry_id)
            else:
                kept, total = kept + 1, total + size
        if dropped:
            db.executemany("DELETE FROM entries WHERE id = ?", [(d,) for d in dropped])
        return dropped

    def discard(self, staging: Path) -> None:
        """Remove a staging folder that will not be committed."""
        if staging.name.startswith(STAGING) and staging.parent == self.folder:
            shutil.rmtree(staging, ignore_errors=True)

    def entries(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The summaries of the entries, newest first."""
        with self._lock:
            rows = self._conn().execute("SELECT summary FROM entries ORDER BY created DESC LIMIT ?", (limit,))
            return [json.loads(r[0]) for r in rows.fetchall()]

    def get(self, entry_id: str) -> Entry | None:
        """The entry ``entry_id``, or None (also for anything that is not an id this server makes)."""
        if not ENTRY_ID.fullmatch(entry_id):
            return None
        with self._lock:
            row = (
                self._conn()
                .execute("SELECT id, created, bytes, meta FROM entries WHERE id = ?", (entry_id,))
                .fetchone()
            )
        return None if row is None else Entry(row[0], row[1], row[2], json.loads(row[3]))

    def delete(self, entry_id: str) -> bool:
        """Remove an entry: invisible once its row is gone, then its files. False if there was none."""
        if not ENTRY_ID.fullmatch(entry_id):
            return False
        with self._lock:
            gone = self._conn().execute("DELETE FROM entries WHERE id = ?", (entry_id,)).rowcount
        if gone:
            shutil.rmtree(self.folder / entry_id, ignore_errors=True)
        return bool(gone)

    def file(self, entry_id: str, relative: str) -> Path:
        """The file at ``relative`` inside entry ``entry_id``'s folder.

        Raises:
            UnsafePath: the path is not of the form this server writes, or leads out of the folder.
            FileNotFoundError: there is no such file.
        """
        if not ENTRY_ID.fullmatch(entry_id):
            raise FileNotFoundError(entry_id)
        check_relative(relative)
        root = self.folder / entry_id
        path = root
        for part in relative.split("/"):
            path = path / part
            if path.is_symlink():
                raise UnsafePath(f"{relative!r} is a link")
        if not path.resolve().is_relative_to(root.resolve()):
            raise UnsafePath(f"{relative!r} leads out of the entry")
        if not path.is_file():
            raise FileNotFoundError(relative)
        return path

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def check_relative(relative: str) -> None:
    """Refuse a relative path unless it has only letters, digits, ``_ . -`` and ``/`` between parts, with no
    ``.`` or ``..`` part: what this server writes. (No ``%``: a path arrives decoded once, and ``%2e%2e``
    decoded again would be ``..``.)

    Raises:
        UnsafePath: anything else.
    """
    if not SAFE_PATH.fullmatch(relative) or any(part in (".", "..") for part in relative.split("/")):
        shown = relative if len(relative) <= 60 else relative[:60] + "..."
        raise UnsafePath(f"{shown!r} is not a file of this entry")
