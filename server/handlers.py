"""The routes: module-level handlers that read the app's :class:`ServerState` (``request.app.state.dsocr``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from dsocr_mlx.options import OCROptions
from dsocr_mlx.processing import decode_image

from . import remote
from .catalog import ModelCatalog
from .guard import as_api_error, error_response
from .protocol import NEEDS_IMAGE, APIError, ChatShapes, OCRRequest, ResponseShapes, parse_request, request_options
from .serving import check_document, document_text, ocr_document, stream_request
from .worker import AsyncJob, InferenceWorker, JobCancelled


@dataclass
class ServerState:
    """What every handler reads: the settings, the configured models and the inference worker."""

    options: OCROptions  # the [ocr] settings: every request's defaults
    limits: dict[str, Any]  # the [server] settings
    models: dict[str, str]  # id -> path or repo id
    default: str
    worker: InferenceWorker
    catalog: ModelCatalog
    checkers: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(2, thread_name_prefix="dsocr-check")
    )
    fetchers: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(4, thread_name_prefix="dsocr-fetch")
    )


def state(request: Request) -> ServerState:
    return request.app.state.dsocr


def pick_model(s: ServerState, name: str | None) -> str:
    """The id of the configured model a request names (default: the served one), by any of its names."""
    found = s.catalog.resolve(name)
    if found is None:
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise APIError(
            404,
            f"the model {shown!r} does not exist; GET /v1/models lists the models and their names",
            code="model_not_found",
            param="model",
        )
    if found != s.default and not s.limits["allow_model_switch"]:
        raise APIError(
            400,
            f"the model {found!r} is configured but model switching is disabled (allow_model_switch = false)",
            code="model_switch_disabled",
            param="model",
        )
    return found


def read_url(s: ServerState, url: str) -> bytes:
    """The bytes of a ``data:`` URL, or of an http(s) URL when remote images are allowed."""
    if url.startswith("data:"):
        return remote.decode_data_url(url)[1]
    if not url.startswith(("http://", "https://")):
        raise APIError(400, "images must be data: or http(s) URLs; local paths are refused", code="invalid_image_url")
    if not s.limits["allow_remote_images"]:
        raise APIError(
            400, "remote image URLs are disabled; send the image as a data: URL", code="remote_images_disabled"
        )
    return remote.fetch_url(url, max_bytes=s.limits["max_body_mb"] << 20, timeout=10.0)


def check_inputs(s: ServerState, sources: list[bytes | str]) -> tuple[list[bytes], bytes | None]:
    """The request's images (fetched bytes or ``data:`` URLs), checked from their headers, or its one PDF,
    checked. Remote fetches run on a pool of their own, so slow hosts never hold up ``data:`` requests."""
    data = [read_url(s, d) if isinstance(d, str) else d for d in sources]
    pdfs = [d for d in data if d.startswith(b"%PDF-")]
    if pdfs and len(data) > 1:
        raise APIError(400, "a PDF must be the only file or image of its request", code="too_many_images")
    for d in data:
        check_document(d, s.limits["max_image_pixels"], None, s.limits["max_pdf_pages"])
    return ([], pdfs[0]) if pdfs else (data, None)


async def off_loop(pool: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` on one of the server's bounded pools: fetching and checking stay off the event loop and
    the inference thread, on a few threads (so a few malloc arenas)."""
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


def require_type(request: Request, media_type: str) -> None:
    """Refuse a body of another media type: a browser page elsewhere can send text/plain or a form to
    this server without asking, but not JSON."""
    got = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if got != media_type:
        raise APIError(
            415, f"send the body as {media_type} (got {got or 'no content type'})", code="unsupported_media_type"
        )


async def read_json(request: Request) -> dict:
    require_type(request, "application/json")
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
        raise APIError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    return body


async def parse(request: Request, key: str) -> tuple[OCRRequest, str]:
    """A chat or responses body parsed, and the id of the model it names."""
    s = state(request)
    req = parse_request(await read_json(request), key, s.options, s.limits["max_tokens_cap"])
    return req, pick_model(s, req.model)


async def queue_job(
    request: Request, req: OCRRequest, name: str, key: str, keep_alive: float | None = None
) -> AsyncJob:
    """Fetch and check a parsed request's images (or PDF), then queue its job on the inference worker."""
    s = state(request)
    urls: list[str | bytes] = [*req.image_urls, *req.files]
    if len(urls) > s.limits["max_images"]:
        raise APIError(400, f"at most {s.limits['max_images']} image(s) per request", code="too_many_images", param=key)
    s.worker.check_room()  # a request that would get 429 costs nothing
    remote_urls = [u for u in urls if isinstance(u, str) and not u.startswith("data:")]
    fetched = {u: await off_loop(s.fetchers, read_url, s, u) for u in remote_urls}
    encoded, pdf_data = await off_loop(s.checkers, check_inputs, s, [fetched.get(u, u) for u in urls])

    def work(model: Any, emit: Callable[[str], None]) -> list:
        images = [decode_image(d, s.limits["max_image_pixels"]) for d in encoded]  # one job's pixels at a time
        return stream_request(model, images, pdf_data, req.options, emit, s.limits["max_pdf_pages"])

    return AsyncJob(s.worker, name, work, s.limits["request_timeout"], keep_alive=keep_alive)


def fixed_stream(chunks: list[str], media_type: str = "text/event-stream") -> StreamingResponse:
    """A streamed answer known in full beforehand (the reply to a conversation without an image)."""

    async def body():
        for chunk in chunks:
            yield chunk

    return StreamingResponse(body(), media_type=media_type, headers={"Cache-Control": "no-cache"})


async def collect(request: Request, job: AsyncJob, output: str) -> str:
    """The whole text of a job whose response is not streamed: its pages' final texts (after a retry,
    only the retry's)."""
    async for _ in job.events(request.is_disconnected):
        pass
    request.state.tokens = sum(r.generated_tokens for r in job.result)
    return document_text(job.result, output)


async def stream(
    request: Request,
    job: AsyncJob,
    opening: list[str],
    piece: Callable[[str], str],
    closing: Callable[[list], list[str]],
    on_error: Callable[[APIError], str],
) -> Response:
    """A server-sent-event response: ``opening`` events, one ``piece`` per text delta, then ``closing``."""
    events = job.events(request.is_disconnected).__aiter__()
    try:  # wait for the first event, so that errors before it still get their HTTP status
        first = [await events.__anext__()]
    except StopAsyncIteration:
        first = []

    async def body():
        try:
            for chunk in opening + [piece(t) for t in first if t]:
                yield chunk
            async for text in events:
                if text:
                    yield piece(text)
            request.state.tokens = sum(r.generated_tokens for r in job.result)
            for chunk in closing(job.result):
                yield chunk
        except Exception as e:  # noqa: BLE001 - past the headers, an error becomes the stream's last event
            if not isinstance(e, JobCancelled):
                yield on_error(as_api_error(e))
        finally:
            job.cancel()  # a no-op once done; otherwise the client left

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def chat_completions(request: Request) -> Response:
    """``POST /v1/chat/completions``."""
    req, name = await parse(request, "messages")
    shapes = ChatShapes(name, req.include_usage)
    if req.needs_image:  # e.g. a client's title or tag request: answered without the model
        if not req.stream:
            return JSONResponse(shapes.completion(NEEDS_IMAGE, []))
        opening = shapes.chunk({"role": "assistant", "content": ""})
        return fixed_stream([opening, shapes.chunk({"content": NEEDS_IMAGE}), *shapes.closing([])])
    job = await queue_job(request, req, name, "messages")
    if not req.stream:
        return JSONResponse(shapes.completion(await collect(request, job, req.options.output), job.result))
    return await stream(
        request,
        job,
        [shapes.chunk({"role": "assistant", "content": ""})],
        lambda text: shapes.chunk({"content": text}),
        shapes.closing,
        shapes.error,
    )


async def responses(request: Request) -> Response:
    """``POST /v1/responses``."""
    req, name = await parse(request, "input")
    shapes = ResponseShapes(name)
    if req.needs_image:  # answered without the model
        if not req.stream:
            return JSONResponse(shapes.response(NEEDS_IMAGE, []))
        return fixed_stream([*shapes.opening(), shapes.delta(NEEDS_IMAGE), *shapes.closing([])])
    job = await queue_job(request, req, name, "input")
    if not req.stream:
        return JSONResponse(shapes.response(await collect(request, job, req.options.output), job.result))
    return await stream(request, job, shapes.opening(), shapes.delta, shapes.closing, shapes.error)


async def ocr_upload(request: Request) -> Response:
    """``POST /v1/ocr``: a multipart ``file`` (image or PDF) and option fields; one result per image or page."""
    s = state(request)
    require_type(request, "multipart/form-data")
    form = await request.form(max_files=1, max_fields=32)
    upload, fields = form.get("file"), {k: v for k, v in form.items() if isinstance(v, str)}
    if upload is None or isinstance(upload, str):
        raise APIError(400, "send the image or PDF as the multipart field 'file'", param="file")
    prompt, name, data = fields.get("prompt"), pick_model(s, fields.get("model")), await upload.read()
    implied = {"prompt": prompt if "<image>" in prompt else "<image>\n" + prompt} if prompt else {}
    if fields.get("ref"):
        implied["ref"] = fields["ref"]
    options = request_options(s.options, fields, s.limits["max_tokens_cap"], text=True, **implied)
    pages, source = fields.get("pages"), upload.filename or "upload"
    s.worker.check_room()  # a request that would get 429 costs nothing
    max_pixels, max_pages = s.limits["max_image_pixels"], s.limits["max_pdf_pages"]
    await off_loop(s.checkers, check_document, data, max_pixels, pages, max_pages)

    def work(model: Any, emit: Callable[[str], None]) -> list[dict]:
        results = ocr_document(
            model, data, options, max_pixels=max_pixels, pages=pages, max_pages=max_pages, on_text=emit
        )
        return [r.to_dict() | {"source": source} for r in results]

    job = AsyncJob(s.worker, name, work, s.limits["request_timeout"])
    [_ async for _ in job.events(request.is_disconnected)]
    request.state.tokens = sum(r["usage"]["completion_tokens"] for r in job.result)
    return JSONResponse({"object": "ocr.result", "model": name, "results": job.result})


def usable_models(s: ServerState) -> list[str]:
    """The ids a request may name: the served model, and the others when switching is allowed."""
    return [n for n in s.models if n == s.default or s.limits["allow_model_switch"]]


async def list_models(request: Request) -> Response:
    """``GET /v1/models``: the models a request may name, whether each is in memory, and its other names."""
    s = state(request)
    data = [s.catalog.openai_model(s.catalog.entries[n], s.worker.resident == n) for n in usable_models(s)]
    return JSONResponse({"object": "list", "data": data})


async def retrieve_model(request: Request) -> Response:
    """``GET /v1/models/{id}``, by any of the model's names."""
    s = state(request)
    name = pick_model(s, request.path_params["model"])
    return JSONResponse(s.catalog.openai_model(s.catalog.entries[name], s.worker.resident == name))


async def health(request: Request) -> Response:
    """``GET /health`` (no key needed): the worker's state, resident model and queue."""
    w = state(request).worker
    body = {"status": w.state, "model": w.resident, "busy": w.busy, "running": len(w.running), "queued": w.queued}
    return JSONResponse(body, 503 if w.state == "error" else 200)


async def on_http_error(request: Request, e: HTTPException) -> Response:
    code = "not_found" if e.status_code == 404 else None
    return error_response(APIError(e.status_code, str(e.detail), code=code), request.url.path)
