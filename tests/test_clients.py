"""The clients people point at the server: Open WebUI's request sequence, the openai SDK's own types,
model names, Ollama's API through the ``ollama`` client, and unloading an idle model (keep_alive).

Every server here is a real uvicorn on a loopback port (tests/test_server.py's ``running_server``).
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

from tests.test_server import KEY, TOKENS, data_url, expected, png, request, running_server

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

from dsocr_server.protocol import NEEDS_IMAGE  # noqa: E402
from openai.types import Model  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402
from openai.types.responses import Response, ResponseStreamEvent  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402

EVENTS = TypeAdapter(ResponseStreamEvent)
ATTACHED = (
    '<attached_files>\n<file type="file" id="3f2c9a" url="3f2c9a" content_type="image/png" name="scan.png"/>\n'
    "</attached_files>\n\n"
)
TITLE_TASK = (
    "### Task:\nGenerate a concise title summarizing the chat history.\n### Guidelines:\n- The title should be "
    'short\n### Output:\nJSON format: { "title": "your concise title here" }\n### Chat History:\n<chat_history>'
    "\nUSER: Convert to markdown\nASSISTANT: # Invoice\n</chat_history>"
)
TAGS_TASK = (
    "### Task:\nGenerate 1-3 broad tags categorizing the main themes of the chat history, along with 1-3 more "
    "specific subtopic tags.\n### Chat History:\n<chat_history>\nUSER: Convert to markdown\n</chat_history>"
)


class CountingModel:
    """The real model, counting the generations it runs (to prove a request never reached it)."""

    def __init__(self, model):
        self.model, self.runs, self.lock = model, 0, threading.Lock()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def stream_ocr(self, *args, **kwargs):
        with self.lock:
            self.runs += 1
        yield from self.model.stream_ocr(*args, **kwargs)


@pytest.fixture(scope="module")
def served(tiny_model, tiny_ckpt):
    """A server whose model counts its generations, and how often it was loaded."""
    counting, loads = CountingModel(tiny_model), []

    def loader(path):
        loads.append(path)
        return counting

    with running_server(tiny_ckpt, loader=loader, aliases=["my-ocr"]) as base:
        yield base, counting, loads


def sse_events(base: str, path: str, body: dict) -> list[dict]:
    """The JSON payloads of a server-sent-event response (without ``[DONE]``)."""
    import urllib.request

    req = urllib.request.Request(base + path, json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {KEY}")
    with urllib.request.urlopen(req, timeout=60) as r:
        lines = r.read().decode().splitlines()
    return [json.loads(line[6:]) for line in lines if line.startswith("data: ") and line != "data: [DONE]"]


def open_webui_message(image: bytes, text: str = "") -> dict:
    """A user turn as Open WebUI 0.12 sends it upstream: its attachment list, the typed text, the image."""
    parts = [{"type": "text", "text": ATTACHED}, {"type": "text", "text": text}]
    return {"role": "user", "content": parts + [{"type": "image_url", "image_url": {"url": data_url(image)}}]}


def test_open_webui_conversation(served, tiny_model):
    """Chat with an image and Open WebUI's attachment marker, its title and tags requests, a follow-up."""
    base, counting, _ = served
    image = png(31)
    official = expected(tiny_model, image)  # the configured task (markdown), as with no text at all
    tools = [{"type": "function", "function": {"name": "get_current_timestamp", "parameters": {"type": "object"}}}]
    body = {
        "model": "tiny",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": "You are helpful."}, open_webui_message(image)],
        "tools": tools,
    }
    events = sse_events(base, "/v1/chat/completions", body)
    for e in events:
        ChatCompletionChunk.model_validate(e, strict=True)
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    usage = events[-1]["usage"]
    assert text == official.text
    assert usage["prompt_tokens"] == official.prompt_tokens  # the marker never became the prompt
    assert counting.runs == 1

    for task in (TITLE_TASK, TAGS_TASK):  # background requests: text only, not streamed, max_tokens 1000
        status, _, reply = request(
            base, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": task}]}
        )
        assert status == 200, reply
        ChatCompletion.model_validate(reply, strict=True)
        assert reply["choices"][0]["message"]["content"] == NEEDS_IMAGE
        assert reply["usage"]["completion_tokens"] == 0
    assert counting.runs == 1  # neither reached the model

    follow_up = {
        "model": "tiny",
        "messages": [
            open_webui_message(image),
            {"role": "assistant", "content": text},
            {"role": "user", "content": [{"type": "text", "text": ATTACHED + "What is the total?"}]},
        ],
    }
    status, _, reply = request(base, "/v1/chat/completions", follow_up)
    assert status == 200, reply
    want = expected(tiny_model, image, prompt="<image>\nWhat is the total?")
    assert reply["choices"][0]["message"]["content"] == want.text
    assert reply["usage"]["prompt_tokens"] == want.prompt_tokens and want.image_tokens > 0
    assert counting.runs == 2


def test_a_real_instruction_still_wins(served, tiny_model):
    base, _, _ = served
    image = png(32)
    body = {"model": "tiny", "messages": [open_webui_message(image, "Free OCR.")]}
    status, _, reply = request(base, "/v1/chat/completions", body)
    want = expected(tiny_model, image, prompt="<image>\nFree OCR.")
    assert status == 200 and reply["choices"][0]["message"]["content"] == want.text
    body = {"model": "tiny", "messages": [open_webui_message(image, "ignored, a task is named")], "task": "free"}
    status, _, reply = request(base, "/v1/chat/completions", body)
    assert reply["usage"]["prompt_tokens"] == expected(tiny_model, image, task="free").prompt_tokens


def test_every_body_passes_the_openai_types(served):
    base, _, _ = served
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png(33))}}]}]
    status, _, reply = request(base, "/v1/chat/completions", {"model": "tiny", "messages": msg})
    ChatCompletion.model_validate(reply, strict=True)
    # A page that ran out of tokens, streamed with usage.
    body = {"model": "tiny", "messages": msg, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": 1}}
    chunks = sse_events(base, "/v1/chat/completions", body)
    for c in chunks:
        ChatCompletionChunk.model_validate(c, strict=True)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    for needs_image in (False, True):
        content = [{"type": "input_text", "text": "hello"}]
        if not needs_image:
            content.append({"type": "input_image", "image_url": data_url(png(34))})
        body = {"model": "tiny", "input": [{"role": "user", "content": content}], "max_output_tokens": TOKENS}
        status, _, reply = request(base, "/v1/responses", body)
        assert status == 200, reply
        Response.model_validate(reply, strict=True)
        events = sse_events(base, "/v1/responses", body | {"stream": True})
        for e in events:
            EVENTS.validate_python(e, strict=True)
        assert events[-1]["type"] == "response.completed"
    status, _, models = request(base, "/v1/models")
    for m in models["data"]:
        Model.model_validate(m, strict=True)
        assert m["state"] in ("loaded", "idle")
    # The SDK itself, validating what it reads.
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, _strict_response_validation=True)
    assert client.models.retrieve("tiny").id == "tiny"
    r = client.chat.completions.create(model="tiny", messages=msg, max_tokens=3)
    assert r.usage.completion_tokens == 3
    assert [c for c in client.chat.completions.create(model="tiny", messages=msg, max_tokens=3, stream=True)]


def test_model_names_resolve(served, tiny_ckpt, tmp_path):
    base, _, _ = served
    status, _, models = request(base, "/v1/models")
    tiny = next(m for m in models["data"] if m["id"] == "tiny")
    assert tiny["state"] == "loaded"
    assert {"deepseek-ocr", "my-ocr"} <= set(tiny["aliases"])
    for name in ("tiny", "TINY", "tiny:latest", "deepseek-ocr", "my-ocr"):
        status, _, model = request(base, f"/v1/models/{name}")
        assert status == 200 and model["id"] == "tiny", (name, model)
    status, _, error = request(base, "/v1/models/deepseek-ai/DeepSeek-OCR-9")
    assert status == 404 and error["error"]["code"] == "model_not_found"
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png(35))}}]}]
    status, _, reply = request(base, "/v1/chat/completions", {"model": "deepseek-ocr", "messages": msg})
    assert status == 200 and reply["model"] == "tiny"

    # A folder from the Hugging Face cache answers to its repo id; with accept_any_model, any name.
    snapshot = tmp_path / "hub" / "models--deepseek-ai--DeepSeek-OCR" / "snapshots" / "0123abc"
    shutil.copytree(tiny_ckpt, snapshot)
    with running_server(snapshot, accept_any_model=True) as other:
        status, _, model = request(other, "/v1/models/deepseek-ai/DeepSeek-OCR")
        assert status == 200 and model["id"] == "0123abc"
        status, _, reply = request(other, "/v1/chat/completions", {"model": "gpt-4o", "messages": msg})
        assert status == 200 and reply["model"] == "0123abc"


def test_ollama_client(served, tiny_model):
    base, counting, _ = served
    client = ollama.Client(host=base, headers={"Authorization": f"Bearer {KEY}"})
    names = [m.model for m in client.list().models]
    assert "tiny:latest" in names
    shown = client.show("tiny")
    assert "vision" in shown.capabilities and shown.details.family == "deepseek_ocr"
    assert [m.model for m in client.ps().models] == ["tiny:latest"]

    image = png(36)
    want = expected(tiny_model, image)
    reply = client.chat(model="tiny", messages=[{"role": "user", "content": "", "images": [image]}])
    assert reply.message.content == want.text and reply.done_reason in ("stop", "length")
    assert reply.prompt_eval_count == want.prompt_tokens and reply.eval_count == want.generated_tokens
    streamed = list(client.chat(model="tiny:latest", messages=[{"role": "user", "images": [image]}], stream=True))
    assert "".join(p.message.content for p in streamed) == want.text and streamed[-1].done

    free = expected(tiny_model, image, prompt="<image>\nFree OCR.")
    generated = client.generate(model="deepseek-ocr", prompt="Free OCR.", images=[image])
    assert generated.response == free.text
    parts = list(client.generate(model="tiny", prompt="Free OCR.", images=[image], stream=True))
    assert "".join(p.response for p in parts) == free.text

    # A follow-up reuses the image of the turn before; a text-only request never reaches the model.
    runs = counting.runs
    follow = client.chat(
        model="tiny",
        messages=[
            {"role": "user", "content": "", "images": [image]},
            {"role": "assistant", "content": want.text},
            {"role": "user", "content": "What is the total?"},
        ],
    )
    assert follow.message.content == expected(tiny_model, image, prompt="<image>\nWhat is the total?").text
    title = client.chat(model="tiny", messages=[{"role": "user", "content": TITLE_TASK}])
    assert title.message.content == NEEDS_IMAGE and counting.runs == runs + 1

    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404 and "not found" in missing.value.error
    status, _, body = request(base, "/api/chat", {"model": "tiny", "messages": [{"role": "user", "images": ["@@"]}]})
    assert status == 400 and isinstance(body["error"], str)


def test_keep_alive_unloads_and_reloads(tiny_model, tiny_ckpt):
    loads = []

    def loader(path):
        loads.append(path)
        return tiny_model

    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png(37))}}]}]
    with running_server(tiny_ckpt, loader=loader, keep_alive="1s") as base:

        def state():
            return request(base, "/v1/models")[2]["data"][0]["state"]

        deadline = time.monotonic() + 30
        while state() != "idle":  # unloaded once idle for keep_alive
            assert time.monotonic() < deadline, "the model was not unloaded"
            time.sleep(0.1)
        status, _, reply = request(base, "/v1/chat/completions", {"model": "tiny", "messages": msg})
        assert status == 200 and reply["choices"][0]["message"]["content"] == expected(tiny_model, png(37)).text
        assert len(loads) == 2  # loaded again on demand
        # Ollama's keep_alive 0 unloads at once; an empty chat loads the model again.
        status, _, body = request(base, "/api/generate", {"model": "tiny", "keep_alive": 0})
        assert status == 200 and body["done_reason"] == "unload" and state() == "idle"
        status, _, body = request(base, "/api/chat", {"model": "tiny", "messages": [], "keep_alive": -1})
        assert body["done_reason"] == "load" and state() == "loaded" and len(loads) == 3
        status, _, body = request(base, "/api/generate", {"model": "tiny", "keep_alive": "soon"})
        assert status == 400 and "keep_alive" in body["error"]


def test_unloading_another_model_keeps_the_resident_one(tiny_model, tiny_ckpt, tmp_path):
    """``ollama stop other`` (keep_alive 0 naming a model that is not in memory) leaves the loaded one loaded."""
    other = tmp_path / "other"
    shutil.copytree(tiny_ckpt, other)
    loads = []

    def loader(path):
        loads.append(path)
        return tiny_model

    with running_server(tiny_ckpt, {"other": str(other)}, loader=loader) as base:
        status, _, body = request(base, "/api/generate", {"model": "other", "keep_alive": 0})
        assert status == 200 and body["done_reason"] == "unload"
        time.sleep(0.3)  # the worker applies a finished job's keep_alive once idle
        assert request(base, "/health", key=None)[2]["model"] == "tiny" and len(loads) == 1
        status, _, body = request(base, "/api/generate", {"model": "tiny", "keep_alive": 0})
        assert status == 200 and request(base, "/health", key=None)[2]["model"] is None


def test_an_unloaded_model_leaves_no_memory_in_the_backends_cache(tiny_model, tiny_ckpt, monkeypatch):
    """MLX keeps freed buffers in its own cache (on Apple's GPU up to the memory limit): unloading empties it,
    or an unloaded model would still hold its memory."""
    mx = pytest.importorskip("mlx.core")
    cleared = []
    monkeypatch.setattr(mx, "clear_cache", lambda: cleared.append(1))
    with running_server(tiny_ckpt, loader=lambda _: tiny_model) as base:
        status, _, body = request(base, "/api/generate", {"model": "tiny", "keep_alive": 0})
        assert status == 200 and body["done_reason"] == "unload" and cleared
