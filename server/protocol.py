"""The OpenAI wire format: request bodies parsed into dataclasses, errors, and chat/responses shapes."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from dsocr_mlx.options import OCROptions, OptionError, coerce, option_fields
from dsocr_mlx.pipeline import OCRResult


class APIError(Exception):
    """An error for the client, in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class OCRRequest:
    """What a chat or responses request asks for, once parsed."""

    model: str | None
    image_urls: list[str] = field(default_factory=list)  # image parts: data: or http(s) URLs
    files: list[str] = field(default_factory=list)  # file parts: data: URLs of PDFs or images
    options: OCROptions = field(default_factory=OCROptions)
    stream: bool = False
    include_usage: bool = False


def _get(body: dict, name: str, kinds: type | tuple, default: Any = None, ok=lambda v: True, want: str = "") -> Any:
    value = body.get(name)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        and bool not in (kinds if isinstance(kinds, tuple) else (kinds,))
        or not isinstance(value, kinds)
        or not ok(value)
    ):
        raise APIError(400, f"'{name}' must be {want or getattr(kinds, '__name__', kinds)}", param=name)
    return value


def _last_user_content(items: Any, key: str) -> Any:
    if isinstance(items, str):
        return items
    if not isinstance(items, list) or not all(isinstance(m, dict) for m in items):
        raise APIError(400, f"'{key}' must be a list of messages", param=key)
    # Multi-turn input is reduced to the last user turn: each OCR request stands alone.
    user = [m for m in items if m.get("role") == "user"]
    if not user:
        raise APIError(400, f"'{key}' has no user message", param=key)
    return user[-1].get("content")


def _split_content(content: Any, key: str) -> tuple[str, list[str], list[str]]:
    if isinstance(content, str):
        return content, [], []
    if not isinstance(content, list):
        raise APIError(400, "message content must be a string or a list of parts", param=key)
    texts, images, files = [], [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "input_image"):
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise APIError(400, "an image part needs an image_url (a data: or http(s) URL)", param=key)
            images.append(url)
        elif kind in ("input_file", "file"):
            holder = part.get("file") if kind == "file" else part
            data = holder.get("file_data") if isinstance(holder, dict) else None
            if not isinstance(data, str):
                raise APIError(400, "a file part needs file_data (a base64 data: URL)", param=key)
            files.append(data)
        else:
            shown = repr(kind) if len(repr(kind)) <= 40 else repr(kind)[:40] + "..."
            raise APIError(400, f"unsupported content part {shown}", param=key)
    return "\n".join(t for t in texts if t.strip()), images, files


MAX_TOKENS_KEYS = ("max_completion_tokens", "max_tokens", "max_output_tokens")  # chat, legacy, responses


def request_options(
    base: OCROptions, fields: dict[str, Any], max_tokens_cap: int, text: bool = False, **given: Any
) -> OCROptions:
    """``base`` (the configured options) with a request's option fields, checked, and its token cap applied.

    ``fields`` is a JSON body, or form fields as strings (``text``); ``given`` are options the request
    implies (a prompt or a task read from its messages).

    Raises:
        APIError: a field of the wrong type or out of range, named in ``param``.
    """
    values, name = dict(given), "max_tokens"
    try:
        for f in option_fields("request"):
            if fields.get(f.name) is not None:
                value = fields[f.name]
                values[f.name] = coerce(f.name, [value] if f.name == "stop" and isinstance(value, str) else value, text)
        name = next((k for k in MAX_TOKENS_KEYS if fields.get(k) is not None), name)
        if fields.get(name) is not None:
            values["max_new_tokens"] = coerce("max_new_tokens", fields[name], text)
            if values["max_new_tokens"] < 1:
                raise OptionError("max_new_tokens", "must be a positive integer")
        # The OpenAI ranges of these two fields.
        if not 0 <= values.get("temperature", 0) <= 2:
            raise OptionError("temperature", "'temperature' must be between 0 and 2")
        if len(values.get("stop", ())) > 4:
            raise OptionError("stop", "'stop' must be a string or a list of up to 4 strings")
        options = base.merged(**values)
    except OptionError as e:
        if e.option == "max_new_tokens":  # the client named it max_tokens (or one of its aliases)
            raise APIError(400, f"'{name}' must be a positive integer", param=name) from None
        raise APIError(400, str(e), param=e.option) from None
    return options.merged(max_new_tokens=min(options.max_new_tokens, max_tokens_cap))


def parse_request(body: dict, key: str, base: OCROptions, max_tokens_cap: int) -> OCRRequest:
    """Parse a chat completions (``key="messages"``) or responses (``key="input"``) body.

    Raises:
        APIError: a field of the wrong type or out of range.
    """
    text, images, files = _split_content(_last_user_content(body.get(key), key), key)
    if _get(body, "n", int, 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    stream = bool(_get(body, "stream", bool))
    # A task picks the official prompt (the text is then what `locate` looks for); otherwise the text is
    # the prompt, and with no text either, the configured task.
    task = _get(body, "task", str)
    if task or not text:
        if not images and not files:
            raise APIError(400, "the request has no image: send one as an image_url part", code="no_image", param=key)
        implied = dict(task=task or base.task or "markdown", ref=text or None)
    else:
        implied = dict(prompt=text if "<image>" in text else "<image>\n" * len(images + files) + text)
    options = request_options(base, body, max_tokens_cap, **implied)
    if stream:  # streamed text cannot be taken back, so a loop ends the stream with finish reason "repetition"
        options = options.merged(retry_on_repetition=False)
    stream_options = _get(body, "stream_options", dict, {})
    return OCRRequest(
        _get(body, "model", str), images, files, options, stream, bool(stream_options.get("include_usage"))
    )


def usage(pages: list[OCRResult], responses: bool = False) -> dict[str, Any]:
    prompt = sum(p.prompt_tokens for p in pages)
    completion = sum(p.generated_tokens for p in pages)
    details = {"cached_tokens": 0, "image_tokens": sum(p.image_tokens for p in pages)}
    if responses:
        return {
            "input_tokens": prompt,
            "input_tokens_details": details,
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": details,
    }


def finish_reason(pages: list[OCRResult]) -> str:
    reasons = {p.finish_reason for p in pages}
    return next((r for r in ("length", "repetition") if r in reasons), "stop")


def sse(data: Any, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


class ChatShapes:
    """The ``chat.completion`` object and its ``chat.completion.chunk`` stream for one request."""

    def __init__(self, model: str, include_usage: bool = False):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.include_usage = include_usage

    def completion(self, text: str, pages: list[OCRResult]) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason(pages),
            "logprobs": None,
        }
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(pages),
        }

    def chunk(self, delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }
        return sse(body | ({"usage": usage} if self.include_usage else {}))

    def closing(self, pages: list[OCRResult]) -> list[str]:
        last = [self.chunk({}, usage=usage(pages))] if self.include_usage else []
        return [self.chunk({}, finish_reason(pages)), *last, sse("[DONE]")]

    def error(self, e: APIError) -> str:
        return sse(e.body()) + sse("[DONE]")


class ResponseShapes:
    """The Responses API ``response`` object and its streaming events for one request."""

    def __init__(self, model: str):
        self.id, self.msg_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created, self.model, self.seq, self.parts = int(time.time()), model, 0, []
        self.where = {"item_id": self.msg_id, "output_index": 0, "content_index": 0}

    def response(self, text: str | None, pages: list[OCRResult] | None) -> dict[str, Any]:
        reason = finish_reason(pages) if pages is not None else None
        status = "in_progress" if reason is None else "incomplete" if reason == "length" else "completed"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "model": self.model,
            "status": status,
            "error": None,
            "finish_reason": reason,
            "incomplete_details": {"reason": "max_output_tokens"} if reason == "length" else None,
            "output": [] if text is None else [self.message(text)],
            "usage": usage(pages, responses=True) if pages is not None else None,
        }

    def message(self, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
        return {
            "id": self.msg_id,
            "type": "message",
            "status": "in_progress" if text is None else "completed",
            "role": "assistant",
            "content": content,
        }

    def event(self, kind: str, **fields: Any) -> str:
        self.seq += 1
        return sse({"type": kind, "sequence_number": self.seq - 1, **fields}, kind)

    def opening(self) -> list[str]:
        return [
            self.event("response.created", response=self.response(None, None)),
            self.event("response.in_progress", response=self.response(None, None)),
            self.event("response.output_item.added", output_index=0, item=self.message(None)),
            self.event(
                "response.content_part.added", **self.where, part={"type": "output_text", "text": "", "annotations": []}
            ),
        ]

    def delta(self, text: str) -> str:
        self.parts.append(text)
        return self.event("response.output_text.delta", **self.where, delta=text, logprobs=[])

    def closing(self, pages: list[OCRResult]) -> list[str]:
        text = "".join(self.parts)
        return [
            self.event("response.output_text.done", **self.where, text=text, logprobs=[]),
            self.event(
                "response.content_part.done",
                **self.where,
                part={"type": "output_text", "text": text, "annotations": []},
            ),
            self.event("response.output_item.done", output_index=0, item=self.message(text)),
            self.event("response.completed", response=self.response(text, pages)),
        ]

    def error(self, e: APIError) -> str:
        return self.event("error", **e.body()["error"])
