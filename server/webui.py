"""The web page at ``/`` and its REST API, with the paths and shapes of the community DeepSeek-OCR Web UI
fork (kazuph/DeepSeek-OCR-WebApp), so its scripts work unchanged.

``GET /api/ping``, ``GET /api/models``, ``POST /api/ocr`` (JSON, or NDJSON events as the pages are read
with ``?stream=1``), ``GET /api/history``, ``GET|DELETE /api/history/{id}``, the entry's images
(``/image/bounding``, ``/image/crop/{path}``, ``/image/input/{path}``), a zip of one model's official
artefacts (``/download``; those are in webhistory.py), and ``POST /api/login`` / ``/api/logout`` for the
page's session cookie. Errors are ``{"detail": "..."}`` as FastAPI writes them (guard.error_response), plus a
``code``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from dsocr_mlx.options import OCROptions, OptionError, option_fields
from dsocr_mlx.settings import default_history_dir

from . import webhistory
from .guard import as_api_error, error_response
from .handlers import ServerState, off_loop, read_json, require_type, state, usable_models
from .history import HistoryStore
from .protocol import MAX_TOKENS_KEYS, APIError, request_options
from .session import make_token, set_cookie_header
from .webocr import (
    Upload,
    entry_response,
    inspect_upload,
    list_item,
    model_info,
    model_label,
    variant_work,
)
from .worker import AsyncJob, JobCancelled, QueueFull

logger = logging.getLogger("dsocr_server")
STATIC = Path(__file__).parent / "static"
MAX_MODELS = 8  # models compared in one request
NDJSON = "application/x-ndjson"


@dataclass
class WebState:
    """What the web routes read besides :class:`ServerState`: the history."""

    store: HistoryStore


def web_state(limits: dict[str, Any]) -> WebState:
    """The history the ``[server]`` settings describe (nothing is created on disk before it is used)."""
    folder = limits["history_dir"] or default_history_dir()
    return WebState(HistoryStore(folder, limits["history_max_entries"], limits["history_max_mb"] << 20))


def web(request: Request) -> WebState:
    return request.app.state.webui


async def ping(request: Request) -> Response:
    """``GET /api/ping``."""
    return JSONResponse({"status": "ok"})


async def models(request: Request) -> Response:
    """``GET /api/models``: the models a request may name, as a list of ``{key, label, ...}``."""
    s = state(request)
    mode = s.options.mode
    return JSONResponse([model_info(s.catalog.entries[n], s.worker.resident == n, mode) for n in usable_models(s)])


def _shown(text: str) -> str:
    return text if len(text) <= 60 else text[:60] + "..."


def resolve_models(s: ServerState, text: str | None) -> list[str]:
    """The model ids a ``models`` field names (comma-separated, by any of their names; default: the served
    model), in the order asked, each once."""
    keys: list[str] = []
    for name in [n.strip() for n in (text or "").split(",") if n.strip()] or [s.default]:
        found = s.catalog.resolve(name)
        if found is None:
            why = f"unknown model key {_shown(name)!r}: GET /api/models lists them"
            raise APIError(400, why, code="model_not_found", param="models")
        if found != s.default and not s.limits["allow_model_switch"]:
            why = f"the model {found!r} is configured but model switching is disabled (allow_model_switch)"
            raise APIError(400, why, code="model_switch_disabled", param="models")
        if found not in keys:
            keys.append(found)
    if len(keys) > MAX_MODELS:
        raise APIError(400, f"at most {MAX_MODELS} models per request", param="models")
    return keys


def per_model_options(s: ServerState, text: str | None, keys: list[str], base: OCROptions) -> dict[str, OCROptions]:
    """Each model's options: ``base`` with its entry of ``model_options`` (a JSON object: model name ->
    option fields), checked against the model's family (a DeepSeek-OCR mode is no DeepSeek-OCR-2 mode)."""
    options = dict.fromkeys(keys, base)
    try:
        given = json.loads(text) if text else {}
    except ValueError:
        given = None
    if not isinstance(given, dict):
        raise APIError(400, "model_options must be a JSON object: model key -> option fields", param="model_options")
    known = {f.name for f in option_fields("request")} | set(MAX_TOKENS_KEYS)
    for name, fields in given.items():
        key = s.catalog.resolve(name)
        if key not in options:
            raise APIError(
                400,
                f"model_options names {_shown(name)!r}, which is not among the models asked for",
                param="model_options",
            )
        if not isinstance(fields, dict) or not set(fields) <= known:
            unknown = sorted(set(fields) - known) if isinstance(fields, dict) else []
            why = (
                f"unknown option {_shown(unknown[0])!r}" if unknown else "its value must be an object of option fields"
            )
            raise APIError(400, f"model_options[{_shown(name)!r}]: {why}", param="model_options")
        options[key] = request_options(base, fields, s.limits["max_tokens_cap"])
    for key, opts in options.items():
        family = s.catalog.entries[key].family
        if family:  # a model not on disk yet is checked when it loads
            try:
                opts.check_family(family)
            except OptionError as e:
                raise APIError(400, f"{key}: {e}", param="mode") from None
    return options


def wants_stream(request: Request, fields: dict[str, str]) -> bool:
    flag = request.query_params.get("stream") or fields.get("stream") or ""
    return flag.lower() in ("1", "true", "yes") or NDJSON in request.headers.get("accept", "")


class WebRun:
    """One ``POST /api/ocr``: a job per model on the worker (one after another: one model is in memory at a
    time), their events, and the entry committed when at least one model succeeded."""

    def __init__(self, request: Request, upload: Upload, keys: list[str], options: dict[str, OCROptions]):
        self.request, self.s, self.store = request, state(request), web(request).store
        self.upload, self.keys, self.options = upload, keys, options
        self.jobs: list[AsyncJob] = []
        self.committed, self.response = False, None

    async def start(self) -> None:
        """Stage the entry and queue every model's job (429 before anything runs if the queue is full)."""
        self.entry_id, self.staging = await asyncio.to_thread(self.store.begin)
        sent: set[int] = set()
        try:
            for i, key in enumerate(self.keys):
                work = variant_work(self.upload, self.options[key], self.staging, f"m{i}", self.s.limits, sent)
                # Each model gets a whole request_timeout: they run back to back.
                self.jobs.append(AsyncJob(self.s.worker, key, work, self.s.limits["request_timeout"] * (i + 1)))
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        """Cancel the jobs; the staging folder goes in a job queued behind them, so no job still writes."""
        for job in self.jobs:
            job.cancel()
        store, staging = self.store, self.staging
        try:
            AsyncJob(self.s.worker, self.keys[0], lambda model, emit: store.discard(staging), 60.0, needs_model=False)
        except QueueFull:
            asyncio.get_running_loop().run_in_executor(None, store.discard, staging)

    def _event(self, key: str, event: tuple) -> dict[str, Any] | None:
        kind = event[0]
        if kind == "begin":
            return {"type": "variant_start", "model": key}
        if kind == "delta":
            return {"type": "delta", "model": key, "index": event[1], "text": event[2]} if event[2] else None
        if kind == "page":
            return {"type": "page_start", "model": key, "index": event[1], **event[2]}
        return {"type": "page_done", "model": key, "index": event[1], "result": event[2]}

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The run's events, ending with ``done`` (the entry, as ``GET /api/history/{id}`` answers it).

        Raises:
            The first model's error when no model succeeded; JobCancelled when the client left.
        """
        variants, warnings, first_error = [], [], None
        catalog = self.s.catalog
        try:
            yield {
                "type": "start",
                "filename": self.upload.filename,
                "pages": self.upload.count,
                "kind": "image" if self.upload.pages is None else "pdf",
                "models": [{"model": k, "label": model_label(catalog.entries[k])} for k in self.keys],
            }
            for key, job in zip(self.keys, self.jobs):
                label = model_label(catalog.entries[key])
                try:
                    async for event in job.events(self.request.is_disconnected):
                        if (out := self._event(key, event)) is not None:
                            yield out
                except JobCancelled:
                    raise
                except Exception as e:  # noqa: BLE001 - one model failing leaves the others' results
                    error = as_api_error(e)
                    if error.status == 500:
                        logger.error("web OCR with %s failed", key, exc_info=e)
                    first_error = first_error or error
                    warnings.append(f"{label}: {error.message}")
                    yield {"type": "variant_error", "model": key, "detail": error.message, "status": error.status}
                    continue
                variants.append(job.result | {"model": key, "label": label})
                yield {"type": "variant_done", "model": key, "elapsed_seconds": job.result["elapsed_seconds"]}
            if not variants:
                raise first_error
            pages = variants[0]["pages"]
            meta = {
                "filename": self.upload.filename,
                "input_images": [{"path": p["input"], "page": n} for n, p in enumerate(pages)],
                "variants": variants,
                "warnings": warnings,
            }
            created = time.time()
            summary = list_item(self.entry_id, created, meta)
            entry = await asyncio.to_thread(self.store.commit, self.entry_id, self.staging, meta, summary, created)
            self.committed = True
            self.response = entry_response(entry.id, entry.created, meta)
            yield {"type": "done", **self.response}
        finally:
            if not self.committed:
                self._abort()


async def ocr(request: Request) -> Response:
    """``POST /api/ocr``: a multipart ``file`` (or ``files``), ``models``, ``prompt`` or ``task``, ``mode``,
    ``pages`` and the other option fields, ``model_options``; the entry, or NDJSON events with ``?stream=1``."""
    s = state(request)
    require_type(request, "multipart/form-data")
    form = await request.form(max_files=2, max_fields=64)
    files = [v for k, v in form.multi_items() if k in ("file", "files") and not isinstance(v, str)]
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    if not files:
        raise APIError(400, "send the image or PDF as the multipart field 'file'", param="file")
    if len(files) > 1:
        raise APIError(400, "send one file per request: a history entry holds one document", param="file")
    if fields.get("history_id"):
        raise APIError(
            400,
            "adding to an entry (history_id) is not supported: name every model in one request (models=a,b)",
            param="history_id",
        )
    keys = resolve_models(s, fields.get("models"))
    streamed = wants_stream(request, fields)
    prompt = fields.get("prompt") or None
    implied = {"prompt": prompt if "<image>" in prompt else "<image>\n" + prompt} if prompt else {}
    if fields.get("ref"):
        implied["ref"] = fields["ref"]
    base = request_options(s.options, fields, s.limits["max_tokens_cap"], text=True, **implied)
    # The page reads Markdown deltas; streamed text cannot be taken back, so a loop is not retried there.
    base = base.merged(output="markdown", retry_on_repetition=False if streamed else None)
    options = per_model_options(s, fields.get("model_options"), keys, base)
    data = await files[0].read()
    if not data:
        raise APIError(400, "the uploaded file is empty", param="file")
    s.worker.check_room()  # a request that would get 429 costs nothing
    max_pixels, max_pages = s.limits["max_image_pixels"], s.limits["max_pdf_pages"]
    name = Path((files[0].filename or "upload").replace("\\", "/")).name[:200] or "upload"
    upload = await off_loop(s.checkers, inspect_upload, data, name, max_pixels, fields.get("pages") or None, max_pages)
    run = WebRun(request, upload, keys, options)
    await run.start()
    if streamed:

        async def body():
            try:
                async for event in run.events():
                    yield json.dumps(event, ensure_ascii=False) + "\n"
            except JobCancelled:
                pass
            except Exception as e:  # noqa: BLE001 - past the headers, an error is the stream's last event
                error = as_api_error(e)
                yield json.dumps({"type": "error", "detail": error.message, "status": error.status}) + "\n"

        return StreamingResponse(body(), media_type=NDJSON, headers={"Cache-Control": "no-cache"})
    async for _ in run.events():
        pass
    return JSONResponse(run.response)


async def login(request: Request) -> Response:
    """``POST /api/login`` with ``{"key": KEY}``: the session cookie the page's image loads carry."""
    api_key = state(request).limits["api_key"]
    body = await read_json(request)
    if not api_key:
        return JSONResponse({"status": "ok", "auth": False})
    key = body.get("key")
    if not (isinstance(key, str) and key.isascii() and hmac.compare_digest(key.encode(), api_key.encode())):
        # Answered here, not raised: Guard drains the body of a 401 it raises, and this one is read already.
        return error_response(APIError(401, "incorrect API key", code="invalid_api_key", param="key"), "/api/login")
    response = JSONResponse({"status": "ok", "auth": True})
    response.headers["set-cookie"] = set_cookie_header(make_token(api_key), secure=request.url.scheme == "https")
    return response


async def logout(request: Request) -> Response:
    """``POST /api/logout``: the session cookie removed."""
    require_type(request, "application/json")
    response = JSONResponse({"status": "ok"})
    response.headers["set-cookie"] = set_cookie_header("", secure=request.url.scheme == "https")
    return response


async def index(request: Request) -> Response:
    """``GET /``: the page (its data comes from /api/*, which asks for the key when one is set)."""
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def routes() -> list:
    """The page's routes (none of them collides with Ollama's /api/tags, chat, generate, show, ps, version)."""
    return [
        Route("/", index),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
        Route("/api/ping", ping),
        Route("/api/models", models),
        Route("/api/ocr", ocr, methods=["POST"]),
        Route("/api/login", login, methods=["POST"]),
        Route("/api/logout", logout, methods=["POST"]),
        Route("/api/history", webhistory.history_list),
        Route("/api/history/{id}", webhistory.history_detail),
        Route("/api/history/{id}", webhistory.history_delete, methods=["DELETE"]),
        Route("/api/history/{id}/image/bounding", webhistory.bounding_image),
        Route("/api/history/{id}/image/bounding/{path:path}", webhistory.bounding_image),
        Route("/api/history/{id}/image/crop/{path:path}", webhistory.crop_image),
        Route("/api/history/{id}/image/input/{path:path}", webhistory.input_image),
        Route("/api/history/{id}/download", webhistory.download),
    ]
