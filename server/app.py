"""The Starlette app: OpenAI-compatible routes over one inference worker, with auth, limits and an access log."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from dsocr_mlx.settings import Settings, load_settings, parse_keep_alive

from . import handlers, ollama, webui
from .catalog import ModelCatalog, model_id
from .guard import Guard, allowed_hosts, check_api_key
from .handlers import ServerState
from .serving import clean_stale_uploads
from .worker import InferenceWorker

ROUTES = [
    Route("/v1/chat/completions", handlers.chat_completions, methods=["POST"]),
    Route("/v1/responses", handlers.responses, methods=["POST"]),
    Route("/v1/ocr", handlers.ocr_upload, methods=["POST"]),
    Route("/v1/models", handlers.list_models),
    Route("/v1/models/{model:path}", handlers.retrieve_model),
    Route("/health", handlers.health),
    # Ollama's API (guard.OLLAMA_ROUTES answers their errors in Ollama's shape).
    Route("/api/tags", ollama.tags, methods=["GET", "HEAD"]),
    Route("/api/ps", ollama.ps),
    Route("/api/version", ollama.version, methods=["GET", "HEAD"]),
    Route("/api/show", ollama.show, methods=["POST"]),
    Route("/api/chat", ollama.chat, methods=["POST"]),
    Route("/api/generate", ollama.generate, methods=["POST"]),
]


def create_app(settings: Settings | None = None, loader: Callable[[str], Any] | None = None) -> Starlette:
    """The server for ``settings`` (as :func:`dsocr_mlx.settings.load_settings` returns them).

    ``loader`` maps a model path to a loaded model (default: ``OCRModel.load`` with the configured backend,
    dtype and device); it runs on the inference thread.

    Raises:
        ValueError: an API key that no client could send, or a keep_alive that is no duration.
    """
    settings = settings or load_settings(create=False)
    limits, model_conf = settings.server, settings.model
    default = model_id(model_conf["path"])
    models = {default: model_conf["path"], **limits["models"]}
    keep_alive = parse_keep_alive(limits["keep_alive"])
    if loader is None:
        from dsocr_mlx.pipeline import OCRModel

        def loader(path: str) -> Any:
            return OCRModel.load(
                path, backend=model_conf["backend"], dtype=model_conf["dtype"], device=model_conf.get("device")
            )

    worker = InferenceWorker(models, default, loader, limits["max_queue"], keep_alive, limits["max_batch"])
    catalog = ModelCatalog(models, default, limits["aliases"], limits["accept_any_model"])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        clean_stale_uploads()
        worker.start()
        yield
        state = app.state.dsocr
        for pool in (state.checkers, state.fetchers):
            pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(app.state.webui.store.close)

    check_api_key(limits["api_key"])
    hosts = allowed_hosts(limits["allowed_hosts"])
    middleware = [
        Middleware(
            Guard,
            api_key=limits["api_key"],
            max_body=limits["max_body_mb"] << 20,
            allowed_hosts=hosts,
            cors_origins=limits["cors_origins"],
        )
    ]
    if limits["cors_origins"]:  # outside Guard, so that preflight requests need no key
        middleware.insert(
            0,
            Middleware(CORSMiddleware, allow_origins=limits["cors_origins"], allow_methods=["*"], allow_headers=["*"]),
        )
    # Every other exception reaches Guard, which answers it in OpenAI's shape.
    app = Starlette(
        routes=ROUTES + (webui.routes() if limits["web_ui"] else []),
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: handlers.on_http_error},
    )
    app.state.dsocr = ServerState(settings.ocr, limits, models, default, worker, catalog)
    app.state.worker = worker
    app.state.webui = webui.web_state(limits)  # the page's history, opened on first use
    return app
