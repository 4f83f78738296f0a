"""The Starlette app: OpenAI-compatible routes over one inference worker, with auth, limits and an access log."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from dsocr_mlx.settings import Settings, load_settings

from . import handlers
from .guard import Guard, allowed_hosts, check_api_key
from .handlers import ServerState
from .serving import clean_stale_uploads
from .worker import InferenceWorker

ROUTES = [
    Route("/v1/chat/completions", handlers.chat_completions, methods=["POST"]),
    Route("/v1/responses", handlers.responses, methods=["POST"]),
    Route("/v1/ocr", handlers.ocr_upload, methods=["POST"]),
    Route("/v1/models", handlers.list_models),
    Route("/health", handlers.health),
]


def model_name(path: str) -> str:
    """The name a configured model is served under: its folder's name, or the repo id."""
    return Path(path).name if Path(path).is_dir() else path


def create_app(settings: Settings | None = None, loader: Callable[[str], Any] | None = None) -> Starlette:
    """The server for ``settings`` (as :func:`dsocr_mlx.settings.load_settings` returns them).

    ``loader`` maps a model path to a loaded model (default: ``OCRModel.load`` with the configured backend,
    dtype and device); it runs on the inference thread.

    Raises:
        ValueError: an API key that no client could send.
    """
    settings = settings or load_settings(create=False)
    limits, model_conf = settings.server, settings.model
    default = model_name(model_conf["path"])
    models = {default: model_conf["path"], **limits["models"]}
    if loader is None:
        from dsocr_mlx.pipeline import OCRModel

        def loader(path: str) -> Any:
            return OCRModel.load(
                path, backend=model_conf["backend"], dtype=model_conf["dtype"], device=model_conf.get("device")
            )

    worker = InferenceWorker(models, default, loader, limits["max_queue"])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        clean_stale_uploads()
        worker.start()
        yield
        state = app.state.dsocr
        for pool in (state.checkers, state.fetchers):
            pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(worker.stop)

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
        routes=ROUTES,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: handlers.on_http_error},
    )
    app.state.dsocr = ServerState(settings.ocr, limits, models, default, worker)
    app.state.worker = worker
    return app
