"""Ollama's API, for desktop clients that speak only Ollama: ``/api/tags``, ``/api/chat``, ``/api/generate``,
``/api/show``, ``/api/ps``, ``/api/version``, on the same worker, options and model names as the OpenAI routes.

Images come as plain base64 strings beside each message; responses stream as NDJSON unless ``"stream":
false`` (Ollama's default is to stream); durations are nanoseconds; errors are ``{"error": "..."}``.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from dsocr_mlx import __version__
from dsocr_mlx.settings import parse_keep_alive

from .catalog import ModelEntry
from .handlers import ServerState, collect, pick_model, queue_job, read_json, state, usable_models
from .protocol import NEEDS_IMAGE, APIError, OCRRequest, Turn, conversation_options, finish_reason, instruction_text
from .worker import AsyncJob, JobCancelled

# The Ollama API version these routes follow (clients check /api/version before they connect).
OLLAMA_API_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"
# Ollama's option names -> the request fields of the OpenAI routes.
OPTION_NAMES = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
    "num_predict": "max_tokens",
}


def now_rfc3339(t: float | None = None) -> str:
    return datetime.datetime.fromtimestamp(time.time() if t is None else t, datetime.timezone.utc).isoformat()


def _images(value: Any, where: str) -> list[bytes]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise APIError(400, f"{where}images must be a list of base64 strings", param="images")
    out = []
    for v in value:
        payload = v.partition(",")[2] if v.startswith("data:") else v  # some clients send data: URLs
        try:
            out.append(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}images holds a string that is not base64", param="images") from None
    return out


def _text(value: Any, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise APIError(400, f"'{name}' must be a string", param=name)
    return instruction_text(value)


def chat_turn(messages: Any) -> Turn:
    """The last user message's text, with its images or the latest earlier user message's (a follow-up)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise APIError(400, "'messages' must be a list of messages", param="messages")
    turns = [
        Turn(_text(m.get("content"), "content"), _images(m.get("images"), f"messages[{i}]."))
        for i, m in enumerate(messages)
        if m.get("role", "user") == "user"
    ]
    if not turns:
        raise APIError(400, "'messages' has no user message", param="messages")
    last = turns[-1]
    earlier = next((t for t in reversed(turns[:-1]) if t.images), None)
    return last if last.images or earlier is None else Turn(last.text, earlier.images)


def ollama_request(s: ServerState, body: dict, turn: Turn) -> OCRRequest:
    """The OCR request of an Ollama body: its options (Ollama's names, or ours as extensions) over the
    configured ones."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'options' must be an object", param="options")
    fields = {k: v for k, v in body.items() if k not in ("model", "messages", "prompt", "images", "options")}
    fields |= {ours: options[theirs] for theirs, ours in OPTION_NAMES.items() if options.get(theirs) is not None}
    if isinstance(fields.get("max_tokens"), int) and fields["max_tokens"] < 0:  # -1: as long as allowed
        fields.pop("max_tokens")
    task = body.get("task") if isinstance(body.get("task"), str) else None
    opts = conversation_options(s.options, fields, s.limits["max_tokens_cap"], turn, task)
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream")
    return OCRRequest(
        model=body.get("model"), image_urls=list(turn.images), options=opts, stream=stream, needs_image=not turn.images
    )


def _keep_alive(body: dict) -> float | None:
    if body.get("keep_alive") is None:
        return None
    try:
        return parse_keep_alive(body["keep_alive"])
    except ValueError as e:
        raise APIError(400, str(e), param="keep_alive") from None


def _model(s: ServerState, body: dict) -> str:
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise APIError(400, "model is required", param="model")
    try:
        return pick_model(s, name)
    except APIError as e:
        if e.status == 404:
            raise APIError(404, f"model '{name[:80]}' not found", code="model_not_found", param="model") from None
        raise


class Shapes:
    """One Ollama response: ``message`` (chat) or ``response`` (generate) chunks, and the final one."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat, self.start = model, chat, time.perf_counter()

    def chunk(self, text: str, done: bool = False, **extra: Any) -> dict[str, Any]:
        content = {"message": {"role": "assistant", "content": text}} if self.chat else {"response": text}
        return {"model": self.model, "created_at": now_rfc3339(), **content, "done": done, **extra}

    def final(self, text: str, pages: list) -> dict[str, Any]:
        total = time.perf_counter() - self.start
        prompt_s = sum(p.timings.get("first_token", 0.0) + p.timings.get("preprocess", 0.0) for p in pages)
        reason = finish_reason(pages)
        return self.chunk(
            text,
            done=True,
            done_reason="length" if reason == "length" else "stop",
            total_duration=int(total * 1e9),
            load_duration=0,
            prompt_eval_count=sum(p.prompt_tokens for p in pages),
            prompt_eval_duration=int(prompt_s * 1e9),
            eval_count=sum(p.generated_tokens for p in pages),
            eval_duration=int(max(total - prompt_s, 0.0) * 1e9),
        )


def ndjson(items: list[dict]) -> str:
    return "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items)


async def _answer(request: Request, body: dict, turn: Turn, chat: bool) -> Response:
    s = state(request)
    name, keep_alive = _model(s, body), _keep_alive(body)
    req = ollama_request(s, body, turn)
    shapes = Shapes(name, chat)
    if req.needs_image:  # a title or tag request of a chat client: answered without the model
        reply = [shapes.chunk(NEEDS_IMAGE), shapes.final("", [])]
        if not req.stream:
            return JSONResponse(shapes.final(NEEDS_IMAGE, []))
        return Response(ndjson(reply), media_type=NDJSON)
    job = await queue_job(request, req, name, "messages" if chat else "images", keep_alive)
    if not req.stream:
        return JSONResponse(shapes.final(await collect(request, job, req.options.output), job.result))
    return await _stream(request, job, shapes)


async def _stream(request: Request, job: AsyncJob, shapes: Shapes) -> Response:
    events = job.events(request.is_disconnected).__aiter__()
    try:  # the first event before the headers, so that errors before it get their HTTP status
        first = [await events.__anext__()]
    except StopAsyncIteration:
        first = []

    async def body():
        try:
            for text in first:
                if text:
                    yield ndjson([shapes.chunk(text)])
            async for text in events:
                if text:
                    yield ndjson([shapes.chunk(text)])
            request.state.tokens = sum(r.generated_tokens for r in job.result)
            yield ndjson([shapes.final("", job.result)])
        except Exception as e:  # noqa: BLE001 - past the headers, an error is the stream's last line
            if not isinstance(e, JobCancelled):
                from .guard import as_api_error

                yield ndjson([{"error": as_api_error(e).message}])
        finally:
            job.cancel()

    return StreamingResponse(body(), media_type=NDJSON, headers={"Cache-Control": "no-cache"})


async def _load_or_unload(request: Request, body: dict, chat: bool) -> Response:
    """A request with nothing to read loads the model, or unloads it with ``keep_alive: 0`` (as Ollama)."""
    s = state(request)
    name, keep_alive = _model(s, body), _keep_alive(body)
    unload = keep_alive == 0
    job = AsyncJob(
        s.worker, name, lambda model, emit: [], s.limits["request_timeout"], keep_alive, needs_model=not unload
    )
    [_ async for _ in job.events(request.is_disconnected)]
    return JSONResponse(Shapes(name, chat).chunk("", done=True, done_reason="unload" if unload else "load"))


async def chat(request: Request) -> Response:
    """``POST /api/chat``."""
    body = await read_json(request)
    if not body.get("messages"):
        return await _load_or_unload(request, body, chat=True)
    return await _answer(request, body, chat_turn(body["messages"]), chat=True)


async def generate(request: Request) -> Response:
    """``POST /api/generate``: ``prompt`` and ``images``."""
    body = await read_json(request)
    if not body.get("prompt") and not body.get("images"):
        return await _load_or_unload(request, body, chat=False)
    for unsupported in ("suffix", "template", "context"):
        if body.get(unsupported):
            raise APIError(400, f"'{unsupported}' is not supported by this OCR model", param=unsupported)
    turn = Turn(_text(body.get("prompt"), "prompt"), _images(body.get("images"), ""))
    return await _answer(request, body, turn, chat=False)


def _details(s: ServerState, entry: ModelEntry) -> dict[str, Any]:
    family = s.catalog.family_name(entry)
    size = f"{entry.parameters / 1e9:.1f}B" if entry.parameters else ""
    return {
        "parent_model": "",
        "format": "safetensors",
        "family": family,
        "families": [family],
        "parameter_size": size,
        "quantization_level": entry.quantization or "",
    }


def _listed(s: ServerState, entry: ModelEntry) -> dict[str, Any]:
    name = entry.id if ":" in entry.id else f"{entry.id}:latest"
    return {
        "name": name,
        "model": name,
        "modified_at": now_rfc3339(entry.modified or None),
        "size": entry.size,
        "digest": entry.digest,
        "details": _details(s, entry),
    }


async def tags(request: Request) -> Response:
    """``GET /api/tags``: the models a request may name."""
    s = state(request)
    return JSONResponse({"models": [_listed(s, s.catalog.entries[n]) for n in usable_models(s)]})


async def ps(request: Request) -> Response:
    """``GET /api/ps``: the model in memory, and when it will be unloaded."""
    s = state(request)
    w, out = s.worker, []
    if w.resident is not None:
        entry = s.catalog.entries[w.resident]
        expires = w.expires if w.expires is not None else time.time() + 100 * 365 * 86400  # kept: far ahead
        device = str(getattr(w.loaded_model, "device", "cpu"))
        on_gpu = device == "gpu" or device.startswith("cuda")  # Ollama counts Apple's unified memory as VRAM
        out.append(
            _listed(s, entry)
            | {"expires_at": now_rfc3339(expires), "size_vram": entry.size if on_gpu else 0, "context_length": 8192}
        )
    return JSONResponse({"models": out})


async def show(request: Request) -> Response:
    """``POST /api/show``: what a model is."""
    s = state(request)
    entry = s.catalog.entries[_model(s, await read_json(request))]
    return JSONResponse(
        {
            "modelfile": "",
            "parameters": "",
            "template": "{{ .Prompt }}",
            "details": _details(s, entry),
            "model_info": {
                "general.architecture": s.catalog.family_name(entry),
                "general.parameter_count": entry.parameters,
                "general.basename": entry.repo_id or entry.id,
                f"{s.catalog.family_name(entry)}.context_length": 8192,
            },
            "capabilities": ["completion", "vision"],
            "modified_at": now_rfc3339(entry.modified or None),
        }
    )


async def version(request: Request) -> Response:
    """``GET /api/version``: the Ollama API level these routes follow (and this server's own version)."""
    return JSONResponse({"version": OLLAMA_API_VERSION, "dsocr_version": __version__})
