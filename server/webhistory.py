"""The web page's history routes: the entries (list, detail, delete), their images and a zip of one model's
artefacts. Every file comes through :meth:`HistoryStore.file` (the path checked, then resolved inside its
entry) and must be one the entry lists."""

from __future__ import annotations

import asyncio
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from .handlers import state
from .history import Entry, HistoryStore, UnsafePath, check_relative
from .protocol import APIError
from .webocr import entry_response, safe_stem


def store(request: Request) -> HistoryStore:
    return request.app.state.webui.store


def _shown(text: str) -> str:
    return text if len(text) <= 60 else text[:60] + "..."


async def history_list(request: Request) -> Response:
    """``GET /api/history``: the entries, newest first."""
    return JSONResponse(await asyncio.to_thread(store(request).entries))


async def _entry(request: Request) -> Entry:
    entry = await asyncio.to_thread(store(request).get, request.path_params["id"])
    if entry is None:
        raise APIError(404, "History entry not found", code="not_found")
    return entry


async def history_detail(request: Request) -> Response:
    """``GET /api/history/{id}``."""
    entry = await _entry(request)
    return JSONResponse(entry_response(entry.id, entry.created, entry.meta))


async def history_delete(request: Request) -> Response:
    """``DELETE /api/history/{id}``: the entry and its files."""
    if not await asyncio.to_thread(store(request).delete, request.path_params["id"]):
        raise APIError(404, "History entry not found", code="not_found")
    return JSONResponse({"status": "deleted"})


def _variant(request: Request, entry: Entry) -> dict[str, Any]:
    """The entry's output of the model ``?model=`` names (by key or any of its names; default: the first)."""
    variants, name = entry.meta["variants"], request.query_params.get("model")
    if not name:
        return variants[0]
    key = state(request).catalog.resolve(name)
    found = next((v for v in variants if v["model"] in (name, key)), None)
    if found is None:
        raise APIError(404, f"this entry has no output of the model {_shown(name)!r}", code="not_found", param="model")
    return found


async def _file(request: Request, entry: Entry, folder: str, relative: str, allowed: list[str]) -> Response:
    """A file of the entry: ``relative`` must be safe (403) and one of ``allowed`` (404)."""
    try:
        check_relative(relative)
    except UnsafePath as e:
        raise APIError(403, str(e), code="forbidden") from None
    if relative not in allowed:
        raise APIError(404, "File not found", code="not_found")
    try:
        path = await asyncio.to_thread(store(request).file, entry.id, f"{folder}/{relative}")
    except UnsafePath as e:
        raise APIError(403, str(e), code="forbidden") from None
    except FileNotFoundError:
        raise APIError(404, "File not found", code="not_found") from None
    return FileResponse(path, headers={"Cache-Control": "private, max-age=86400"})


async def bounding_image(request: Request) -> Response:
    """``GET /api/history/{id}/image/bounding[/{path}]?model=``: a page with its boxes drawn (the first)."""
    entry = await _entry(request)
    v = _variant(request, entry)
    allowed = [p["bounding_image"] for p in v["pages"]]
    return await _file(request, entry, v["slug"], request.path_params.get("path", allowed[0]), allowed)


async def crop_image(request: Request) -> Response:
    """``GET /api/history/{id}/image/crop/{path}?model=``: a figure cut from a page."""
    entry = await _entry(request)
    v = _variant(request, entry)
    return await _file(request, entry, v["slug"], request.path_params["path"], [c["path"] for c in v["crops"]])


async def input_image(request: Request) -> Response:
    """``GET /api/history/{id}/image/input/{path}``: a page as it was read."""
    entry = await _entry(request)
    allowed = [i["path"].removeprefix("input/") for i in entry.meta["input_images"]]
    return await _file(request, entry, "input", request.path_params["path"], allowed)


def _zip(folder: Path, prefix: str) -> str:
    fd, name = tempfile.mkstemp(prefix="dsocr-zip-", suffix=".zip")
    with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                z.write(path, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return name


async def download(request: Request) -> Response:
    """``GET /api/history/{id}/download?model=``: the model's official artefacts as a zip."""
    entry = await _entry(request)
    v = _variant(request, entry)
    stem = f"{safe_stem(entry.meta['filename'])}-{safe_stem(v['model'])}"
    name = await asyncio.to_thread(_zip, store(request).folder / entry.id / v["slug"], stem)
    return FileResponse(
        name, media_type="application/zip", filename=f"{stem}.zip", background=BackgroundTask(os.unlink, name)
    )
