"""The Starlette app: OpenAI-compatible routes over one inference worker, with auth, limits and an access log."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dsocr_mlx import remote
from dsocr_mlx.serving import ocr_document, stream_request
from dsocr_mlx.settings import load_settings
from dsocr_mlx.worker import AsyncJob, InferenceWorker, JobCancelled, JobTimeout, ModelLoadError, QueueFull

from .protocol import APIError, ChatShapes, OCRRequest, ResponseShapes, parse_request

logger = logging.getLogger("dsocr_server")
access_log = logging.getLogger("dsocr_server.access")


class BodyTooLarge(Exception):
    pass


def as_api_error(e: BaseException) -> APIError:
    """Map library and worker exceptions to HTTP errors; anything unexpected stays a generic 500."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFull):
        return APIError(429, str(e), "rate_limit_error", "queue_full", headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, JobTimeout):
        return APIError(504, "the request took longer than the server's request_timeout", "timeout_error", "timeout")
    if isinstance(e, ModelLoadError):
        return APIError(503, str(e), "server_error", "model_unavailable")
    if isinstance(e, JobCancelled):
        return APIError(499, "the client closed the request", code="client_closed")
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    return APIError(500, "internal server error", "server_error")


class Guard:
    """Outermost checks: API key (constant-time), body size, one access-log line, and no traceback out."""

    def __init__(self, app: Any, api_key: str, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, received = time.perf_counter(), [0], [0]

        async def send_logged(message: dict) -> None:
            status[0] = message.get("status", status[0])
            await send(message)

        async def receive_limited() -> dict:
            message = await receive()
            received[0] += len(message.get("body", b""))
            if received[0] > self.max_body:
                raise BodyTooLarge()
            return message

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        scheme, _, key = headers.get("authorization", "").partition(" ")
        try:
            if self.api_key and scope["path"] != "/health" and not (
                    scheme.lower() == "bearer" and hmac.compare_digest(key.encode(), self.api_key.encode())):
                raise APIError(401, "missing or incorrect API key (send Authorization: Bearer KEY)",
                               code="invalid_api_key")
            if int(headers.get("content-length") or 0) > self.max_body:
                raise BodyTooLarge()
            await self.app(scope, receive_limited, send_logged)
        except Exception as e:  # noqa: BLE001 - the last line of defence: log it, answer in OpenAI's shape
            error = as_api_error(APIError(413, f"the request body is larger than {self.max_body} bytes",
                                          code="body_too_large") if isinstance(e, BodyTooLarge) else e)
            if error.status == 500:
                logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not status[0]:
                # Read (and drop) a bounded rest of the body first: a client still sending would get a reset.
                drained, more = 0, error.status in (401, 413)
                while more and drained <= self.max_body:
                    message = await receive()
                    drained, more = drained + len(message.get("body", b"")), message.get("more_body", False)
                await error_response(error)(scope, receive, send_logged)
        finally:
            access_log.info('%s "%s %s" %d %.0fms tokens=%s', (scope.get("client") or ("-",))[0], scope["method"],
                            scope["path"], status[0], 1000 * (time.perf_counter() - start),
                            scope.get("state", {}).get("tokens", "-"))


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), e.status, headers=e.headers)


def create_app(settings: dict | None = None, loader: Callable[[str], Any] | None = None) -> Starlette:
    """The server for ``settings`` (as :func:`dsocr_mlx.settings.load_settings` returns them).

    ``loader`` maps a model path to a loaded model (default: ``OCRModel.load`` with the configured backend,
    dtype and device); it runs on the inference thread. The configured model is named after its folder.
    """
    settings = settings or load_settings(create=False)
    conf, ocr_conf, model_conf = settings["server"], settings["ocr"], settings["model"]
    default = Path(model_conf["path"]).name if Path(model_conf["path"]).is_dir() else model_conf["path"]
    models = {default: model_conf["path"], **conf["models"]}
    if loader is None:
        from dsocr_mlx.pipeline import OCRModel

        def loader(path: str) -> Any:
            return OCRModel.load(path, backend=model_conf["backend"], dtype=model_conf["dtype"],
                                 device=model_conf.get("device"))

    worker = InferenceWorker(models, default, loader, conf["max_queue"])

    def pick_model(name: str | None) -> str:
        if (name := name or default) not in models:
            raise APIError(404, f"the model {name!r} does not exist", code="model_not_found", param="model")
        if name != default and not conf["allow_model_switch"]:
            raise APIError(400, f"the model {name!r} is configured but model switching is disabled "
                                "(allow_model_switch = false)", code="model_switch_disabled", param="model")
        return name

    def read_url(url: str) -> bytes:
        if url.startswith("data:"):
            return remote.decode_data_url(url)[1]
        if not url.startswith(("http://", "https://")):
            raise APIError(400, "images must be data: or http(s) URLs; local paths are refused",
                           code="invalid_image_url")
        if not conf["allow_remote_images"]:
            raise APIError(400, "remote image URLs are disabled; send the image as a data: URL",
                           code="remote_images_disabled")
        return remote.fetch_url(url, max_bytes=conf["max_body_mb"] << 20, timeout=10.0)

    def load_inputs(req: OCRRequest) -> tuple[list, bytes | None]:
        """Runs in a thread pool: fetching and decoding stay off the event loop and the inference thread."""
        data = [read_url(u) for u in req.image_urls + req.files]
        pdfs = [d for d in data if d.startswith(b"%PDF-")]
        if pdfs and len(data) > 1:
            raise APIError(400, "a PDF must be the only file or image of its request", code="too_many_images")
        return [remote.decode_image(d, conf["max_image_pixels"]) for d in data if not pdfs], (pdfs or [None])[0]

    async def submit(request: Request, key: str) -> tuple[OCRRequest, str, AsyncJob]:
        try:
            body = await request.json()
        except ValueError:
            raise APIError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        req = parse_request(body, key, ocr_conf, conf["max_tokens_cap"])
        name = pick_model(req.model)
        if len(req.image_urls) + len(req.files) > conf["max_images"]:
            raise APIError(400, f"at most {conf['max_images']} image(s) per request", code="too_many_images",
                           param=key)
        images, pdf_data = await asyncio.to_thread(load_inputs, req)

        def work(model: Any, emit: Callable[[str], None]) -> list:
            return stream_request(model, images, pdf_data, req.options, emit, ocr_conf["dpi"], conf["max_pdf_pages"])

        return req, name, AsyncJob(worker, name, work, conf["request_timeout"])

    async def collect(request: Request, job: AsyncJob) -> str:
        text = "".join([t async for t in job.events(request.is_disconnected)])
        request.state.tokens = sum(p.completion_tokens for p in job.result)
        return text

    async def stream(request: Request, job: AsyncJob, opening: list[str], piece: Callable[[str], str],
                     closing: Callable[[list], list[str]], on_error: Callable[[APIError], str]) -> Response:
        events = job.events(request.is_disconnected).__aiter__()
        try:  # wait for the first token, so that errors before it still get their HTTP status
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
                request.state.tokens = sum(p.completion_tokens for p in job.result)
                for chunk in closing(job.result):
                    yield chunk
            except Exception as e:  # noqa: BLE001 - past the headers, an error becomes the stream's last event
                if not isinstance(e, JobCancelled):
                    yield on_error(as_api_error(e))
            finally:
                job.cancel()  # a no-op once done; otherwise the client left

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def chat(request: Request) -> Response:
        req, name, job = await submit(request, "messages")
        shapes = ChatShapes(name, req.include_usage)
        if not req.stream:
            return JSONResponse(shapes.completion(await collect(request, job), job.result))
        return await stream(request, job, [shapes.chunk({"role": "assistant", "content": ""})],
                            lambda text: shapes.chunk({"content": text}), shapes.closing, shapes.error)

    async def responses(request: Request) -> Response:
        req, name, job = await submit(request, "input")
        shapes = ResponseShapes(name)
        if not req.stream:
            return JSONResponse(shapes.response(await collect(request, job), job.result))
        return await stream(request, job, shapes.opening(), shapes.delta, shapes.closing, shapes.error)

    async def ocr_upload(request: Request) -> Response:
        form = await request.form(max_files=1, max_fields=16)
        upload, f = form.get("file"), {k: v for k, v in form.items() if isinstance(v, str)}
        if upload is None or isinstance(upload, str):
            raise APIError(400, "send the image or PDF as the multipart field 'file'", param="file")
        if not f.get("max_tokens", "1").isdigit():
            raise APIError(400, "'max_tokens' must be a positive integer", param="max_tokens")
        prompt, name, data = f.get("prompt"), pick_model(f.get("model")), await upload.read()
        kwargs = dict(prompt=prompt if not prompt or "<image>" in prompt else "<image>\n" + prompt,
                      task=None if prompt else f.get("task") or ocr_conf["task"], ref=f.get("ref"),
                      mode=f.get("mode") or ocr_conf["mode"], detect_loops=ocr_conf["detect_loops"],
                      max_new_tokens=min(int(f.get("max_tokens") or ocr_conf["max_new_tokens"]),
                                         conf["max_tokens_cap"]),
                      retry_on_repetition=ocr_conf["retry_on_repetition"], pages=f.get("pages"), dpi=ocr_conf["dpi"],
                      max_pages=conf["max_pdf_pages"], max_pixels=conf["max_image_pixels"])

        def work(model: Any, emit: Callable[[str], None]) -> list[dict]:
            results = ocr_document(model, data, on_text=emit, **kwargs)
            return [r.to_dict() | {"source": upload.filename or "upload"} for r in results]

        job = AsyncJob(worker, name, work, conf["request_timeout"])
        [_ async for _ in job.events(request.is_disconnected)]
        request.state.tokens = sum(r["usage"]["completion_tokens"] for r in job.result)
        return JSONResponse({"object": "ocr.result", "model": name, "results": job.result})

    async def list_models(request: Request) -> Response:
        usable = [n for n in models if n == default or conf["allow_model_switch"]]
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "dsocr-mlx"} for n in usable]})

    async def health(request: Request) -> Response:
        body = {"status": worker.state, "model": worker.resident, "busy": worker.busy, "queued": worker.queue.qsize()}
        return JSONResponse(body, 503 if worker.state == "error" else 200)

    async def on_http_error(request: Request, e: HTTPException) -> Response:
        return error_response(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404
                                       else None))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)

    middleware = [Middleware(Guard, api_key=conf["api_key"], max_body=conf["max_body_mb"] << 20)]
    if conf["cors_origins"]:  # outside Guard, so that preflight requests need no key
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=conf["cors_origins"], allow_methods=["*"],
                                        allow_headers=["*"]))
    routes = [Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/responses", responses, methods=["POST"]), Route("/v1/ocr", ocr_upload, methods=["POST"]),
              Route("/v1/models", list_models), Route("/health", health)]
    # Every other exception reaches Guard, which answers it in OpenAI's shape.
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: on_http_error})
    app.state.worker = worker
    return app
