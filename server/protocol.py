"""The OpenAI wire format: request bodies parsed into dataclasses, errors, and chat/responses shapes."""

from __future__ import annotations

import json
import re
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
    image_urls: list[str | bytes] = field(default_factory=list)  # image parts: data: or http(s) URLs, or bytes
    files: list[str] = field(default_factory=list)  # file parts: data: URLs of PDFs or images
    options: OCROptions = field(default_factory=OCROptions)
    stream: bool = False
    include_usage: bool = False
    needs_image: bool = False  # the conversation holds no image: answered at once, without the model


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


# Text that clients add beside an image but that is not an instruction: Open WebUI's list of attached
# files (``<attached_files><file .../></attached_files>``), and stray ``<file .../>`` tags.
CLIENT_BOILERPLATE = re.compile(r"<attached_files>.*?</attached_files>|<file\b[^>]*/>", re.DOTALL)


def instruction_text(text: str) -> str:
    """A message's text without client boilerplate, stripped: what the user actually asked."""
    return CLIENT_BOILERPLATE.sub("", text).strip()


@dataclass
class Turn:
    """One user message: its instruction text and its images and files (``data:`` or http(s) URLs, or
    the bytes themselves)."""

    text: str = ""
    images: list[str | bytes] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def _user_turns(items: Any, key: str) -> list[Turn]:
    if isinstance(items, str):
        return [Turn(instruction_text(items))]
    if not isinstance(items, list) or not all(isinstance(m, dict) for m in items):
        raise APIError(400, f"'{key}' must be a list of messages", param=key)
    # Responses API input items without a role are user input too (e.g. a bare input_image item).
    turns = [_split_content(m.get("content"), key) for m in items if m.get("role", "user") == "user"]
    if not turns:
        raise APIError(400, f"'{key}' has no user message", param=key)
    return turns


def read_conversation(items: Any, key: str) -> Turn:
    """What a conversation asks for: the last user turn's instruction, with its own images, or else the
    images of the latest earlier user turn that had some (a follow-up question about the same page)."""
    turns = _user_turns(items, key)
    last = turns[-1]
    if last.images or last.files:
        return last
    earlier = next((t for t in reversed(turns[:-1]) if t.images or t.files), None)
    return Turn(last.text, earlier.images, earlier.files) if earlier else last


def _split_content(content: Any, key: str) -> Turn:
    if content is None:
        return Turn()
    if isinstance(content, str):
        return Turn(instruction_text(content))
    if not isinstance(content, list):
        raise APIError(400, "message content must be a string or a list of parts", param=key)
    texts, images, files = [], [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
            texts.append(instruction_text(part["text"]))
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
    return Turn("\n".join(t for t in texts if t), images, files)


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

    A conversation without any image is still a valid request: :attr:`OCRRequest.needs_image` says so,
    and it is answered without the model.

    Raises:
        APIError: a field of the wrong type or out of range.
    """
    turn = read_conversation(body.get(key), key)
    if _get(body, "n", int, 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    stream = bool(_get(body, "stream", bool))
    task = _get(body, "task", str)
    options = conversation_options(base, body, max_tokens_cap, turn, task)
    if stream:  # streamed text cannot be taken back, so a loop ends the stream with finish reason "repetition"
        options = options.merged(retry_on_repetition=False)
    stream_options = _get(body, "stream_options", dict, {})
    return OCRRequest(
        model=_get(body, "model", str),
        image_urls=turn.images,
        files=turn.files,
        options=options,
        stream=stream,
        include_usage=bool(stream_options.get("include_usage")),
        needs_image=not (turn.images or turn.files),
    )


def conversation_options(
    base: OCROptions, fields: dict, max_tokens_cap: int, turn: Turn, task: str | None = None
) -> OCROptions:
    """The options of a request whose conversation asks ``turn``.

    A task picks the official prompt (the text is then what ``locate`` looks for); otherwise the text is
    the prompt, and with no text either, the configured task.
    """
    count = len(turn.images + turn.files) or 1
    if task or not turn.text:
        implied = dict(task=task or base.task or "markdown", ref=turn.text or None)
    else:
        implied = dict(prompt=turn.text if "<image>" in turn.text else "<image>\n" * count + turn.text)
    return request_options(base, fields, max_tokens_cap, **implied)


NEEDS_IMAGE = (
    "This is an OCR model: it reads images. Attach an image or a PDF (or ask about one sent earlier in "
    "this conversation) and it will return the text."
)


def usage(pages: list[OCRResult], responses: bool = False) -> dict[str, Any]:
    prompt = sum(p.prompt_tokens for p in pages)
    completion = sum(p.generated_tokens for p in pages)
    image_tokens = sum(p.image_tokens for p in pages)
    if responses:
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0, "image_tokens": image_tokens},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": image_tokens},
    }


def finish_reason(pages: list[OCRResult]) -> str:
    """The request's finish reason: ``length`` if a page ran out of tokens, ``repetition`` if one looped,
    else ``stop``."""
    reasons = {p.finish_reason for p in pages}
    return next((r for r in ("length", "repetition") if r in reasons), "stop")


def openai_finish_reason(reason: str) -> str:
    """OpenAI's word for it: a repetition loop is a stop (``ocr_finish_reason`` says which)."""
    return "length" if reason == "length" else "stop"


def sse(data: Any, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


class ChatShapes:
    """The ``chat.completion`` object and its ``chat.completion.chunk`` stream for one request."""

    def __init__(self, model: str, include_usage: bool = False):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.include_usage = include_usage

    def completion(self, text: str, pages: list[OCRResult]) -> dict[str, Any]:
        reason = finish_reason(pages)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": openai_finish_reason(reason),
            "ocr_finish_reason": reason,
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
        choice = {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}
        if finish is not None:
            choice |= {"finish_reason": openai_finish_reason(finish), "ocr_finish_reason": finish}
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [] if usage else [choice],
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
            "ocr_finish_reason": reason,
            "incomplete_details": {"reason": "max_output_tokens"} if reason == "length" else None,
            "output": [] if text is None else [self.message(text)],
            "parallel_tool_calls": False,
            "tool_choice": "none",
            "tools": [],
            "usage": usage(pages, responses=True) if pages is not None else None,
        }

    def message(self, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [self.text_part(text)]
        return {
            "id": self.msg_id,
            "type": "message",
            "status": "in_progress" if text is None else "completed",
            "role": "assistant",
            "content": content,
        }

    @staticmethod
    def text_part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def event(self, kind: str, **fields: Any) -> str:
        self.seq += 1
        return sse({**fields, "type": kind, "sequence_number": self.seq - 1}, kind)

    def opening(self) -> list[str]:
        return [
            self.event("response.created", response=self.response(None, None)),
            self.event("response.in_progress", response=self.response(None, None)),
            self.event("response.output_item.added", output_index=0, item=self.message(None)),
            self.event("response.content_part.added", **self.where, part=self.text_part("")),
        ]

    def delta(self, text: str) -> str:
        self.parts.append(text)
        return self.event("response.output_text.delta", **self.where, delta=text, logprobs=[])

    def closing(self, pages: list[OCRResult]) -> list[str]:
        text = "".join(self.parts)
        return [
            self.event("response.output_text.done", **self.where, text=text, logprobs=[]),
            self.event("response.content_part.done", **self.where, part=self.text_part(text)),
            self.event("response.output_item.done", output_index=0, item=self.message(text)),
            self.event("response.completed", response=self.response(text, pages)),
        ]

    def error(self, e: APIError) -> str:
        error = e.body()["error"]
        return self.event("error", code=error["code"], message=error["message"], param=error["param"])
