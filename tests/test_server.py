"""The OpenAI-compatible server: a real uvicorn on a loopback port, driven by the official openai client."""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import io
import json
import logging
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("mlx.core")
pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from dsocr_server import create_app, remote  # noqa: E402
from dsocr_server.protocol import NEEDS_IMAGE  # noqa: E402

import dsocr_mlx  # noqa: E402
from dsocr_mlx.pipeline import join_pages  # noqa: E402
from dsocr_mlx.processing import decode_image  # noqa: E402
from dsocr_mlx.random_checkpoint import tiny_args, write_random_checkpoint  # noqa: E402
from dsocr_mlx.settings import Settings  # noqa: E402
from dsocr_mlx.textstream import TextStream, final_text  # noqa: E402

KEY = "test-key"
TOKENS = 6


def png(seed: int = 0, size: tuple[int, int] = (120, 90)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_message(data: bytes, text: str | None = None, images: int = 1) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(data)}}] * images
    return [{"role": "user", "content": parts + ([{"type": "text", "text": text}] if text else [])}]


def huge_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (a decompression bomb's calling card)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlowModel:
    """The real model with a pause after each token, so jobs last long enough to queue and cancel."""

    def __init__(self, model, delay: float):
        self.model, self.delay = model, delay

    def __getattr__(self, name):
        return getattr(self.model, name)

    def stream_ocr(self, *args, **kwargs):
        for response in self.model.stream_ocr(*args, **kwargs):
            time.sleep(self.delay)
            yield response


@contextlib.contextmanager
def running_server(
    ckpt: Path, extra_models: dict | None = None, loader=None, backend: str = "mlx", ocr: dict | None = None, **server
):
    settings = Settings()
    settings.model.update(path=str(ckpt), dtype="float32", backend=backend)
    settings.ocr = settings.ocr.merged(**{"mode": "tiny", "max_new_tokens": TOKENS, **(ocr or {})})
    settings.server.update(
        {"api_key": KEY, "max_body_mb": 1, "max_tokens_cap": 64, "models": extra_models or {}, **server}
    )
    app = create_app(settings, loader=loader)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if json.load(r)["status"] in ("ready", "idle"):  # idle: loaded, then unloaded (keep_alive)
                    break
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.05)
    try:
        yield base
    finally:
        srv.should_exit = True
        thread.join(30)


def request(
    base: str,
    path: str,
    body: bytes | dict | None = None,
    key: str | None = KEY,
    headers: dict | None = None,
    method: str | None = None,
    timeout: float = 60,
):
    """Plain HTTP: (status, headers, parsed JSON or text)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(base + path, data=data, method=method or ("POST" if data is not None else "GET"))
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, hdrs, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, e.headers, e.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw.decode()


def multipart(fields: dict, file: tuple[str, bytes]) -> tuple[bytes, str]:
    boundary = "dsocrboundary7a1"
    out = b""
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    out += (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file[0]}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + file[1]
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return out, f"multipart/form-data; boundary={boundary}"


def assert_error(status: int, body, expected: int, code: str | None = None) -> None:
    assert status == expected, body
    assert isinstance(body, dict) and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body


@pytest.fixture(scope="module")
def second_ckpt(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt2") / "tiny2", tiny_args(), seed=11)


@pytest.fixture(scope="module")
def base(tiny_ckpt, second_ckpt):
    models = {"tiny2": str(second_ckpt), "broken": str(second_ckpt.parent / "missing")}
    with running_server(tiny_ckpt, models) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60)


def expected(model, data: bytes | None, tokens: int = TOKENS, **kwargs):
    image = Image.open(io.BytesIO(data)) if data is not None else None
    return model.ocr(image, mode="tiny", max_new_tokens=tokens, retry_on_repetition=False, **kwargs)


def test_health_and_models(base, client):
    status, _, body = request(base, "/health", key=None)  # health needs no key
    assert status == 200 and body["status"] == "ready"
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny2", "broken"]
    status, headers, _ = request(
        base,
        "/v1/models",
        None,
        method="OPTIONS",
        headers={"Origin": "http://app.test", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in headers  # CORS is off unless configured


def test_chat_matches_the_library(client, tiny_model, caplog):
    caplog.set_level(logging.INFO, logger="dsocr_server.access")
    data = png(1)
    want = expected(tiny_model, data)
    r = client.chat.completions.create(model="tiny", messages=image_message(data), max_tokens=TOKENS)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason == "length"
    assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.completion_tokens == TOKENS
    assert r.usage.prompt_tokens_details.image_tokens == want.image_tokens > 0

    stream = client.chat.completions.create(
        model="tiny",
        messages=image_message(data),
        max_tokens=TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == TOKENS
    lines = [r.getMessage() for r in caplog.records if r.name == "dsocr_server.access"]
    assert any('"POST /v1/chat/completions" 200' in line and f"tokens={TOKENS}" in line for line in lines), lines


def test_the_torch_backend_serves_the_same_api(tiny_ckpt):
    pytest.importorskip("torch")
    import dsocr_mlx

    data = png(5)
    want = expected(dsocr_mlx.load(str(tiny_ckpt), backend="torch", dtype="float32"), data)
    with running_server(tiny_ckpt, backend="torch") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        r = client.chat.completions.create(model="tiny", messages=image_message(data), max_tokens=TOKENS)
        assert r.choices[0].message.content == want.text and r.usage.completion_tokens == TOKENS
        stream = client.chat.completions.create(
            model="tiny", messages=image_message(data), max_tokens=TOKENS, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.text


def test_chat_stream_wire_format_and_extensions(base, client, tiny_model):
    data = png(2)
    body = {"model": "tiny", "messages": image_message(data), "max_tokens": TOKENS, "stream": True}
    status, headers, text = request(base, "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line for line in text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])

    want = expected(tiny_model, data, 16, task="free")
    raw = client.chat.completions.create(
        model="tiny", messages=image_message(data), max_tokens=16, extra_body={"task": "free", "output": "raw"}
    )
    assert raw.choices[0].message.content == want.raw_text
    as_json = client.chat.completions.create(
        model="tiny", messages=image_message(data), max_tokens=16, extra_body={"task": "free", "output": "json"}
    )
    assert json.loads(as_json.choices[0].message.content) == {"text": want.text, "blocks": []}
    # A stop string ends the text just before it, with finish reason "stop".
    stop = want.text[len(want.text) // 2 :][:3]
    cut = client.chat.completions.create(
        model="tiny", messages=image_message(data), max_tokens=16, stop=[stop], extra_body={"task": "free"}
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == want.text[: want.text.index(stop)].strip()
    # Multi-turn input keeps the last user turn; a text prompt gets the image placeholder.
    turns = [
        {"role": "user", "content": "old question"},
        {"role": "assistant", "content": "old answer"},
        *image_message(data, "Free OCR."),
    ]
    again = client.chat.completions.create(model="tiny", messages=turns, max_tokens=16)
    assert again.choices[0].message.content == want.text


def test_responses_string_image_and_pdf(client, tiny_model, tmp_path):
    # A conversation without an image is answered at once, without the model.
    r = client.responses.create(model="tiny", input="hello", max_output_tokens=TOKENS)
    assert r.output_text == NEEDS_IMAGE and r.usage.output_tokens == 0
    events = list(client.responses.create(model="tiny", input="hello", max_output_tokens=TOKENS, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == NEEDS_IMAGE
    assert events[-1].response.output_text == NEEDS_IMAGE

    data = png(3)
    parts = [{"type": "input_image", "image_url": data_url(data)}]
    r = client.responses.create(model="tiny", input=[{"role": "user", "content": parts}], max_output_tokens=TOKENS)
    assert r.output_text == expected(tiny_model, data).text
    assert r.usage.input_tokens_details.image_tokens > 0

    pages = [Image.fromarray(np.random.default_rng(s).integers(0, 255, (80, 60, 3), dtype=np.uint8)) for s in (4, 5)]
    path = tmp_path / "two.pdf"
    pages[0].save(path, "PDF", save_all=True, append_images=pages[1:])
    want = join_pages(tiny_model.ocr_many([path], mode="tiny", max_new_tokens=4, retry_on_repetition=False))
    file_part = [
        {"type": "input_file", "filename": "two.pdf", "file_data": data_url(path.read_bytes(), "application/pdf")}
    ]
    r = client.responses.create(model="tiny", input=[{"role": "user", "content": file_part}], max_output_tokens=4)
    assert r.output_text == want and want.count("<--- Page Split --->") == 2
    events = list(
        client.responses.create(
            model="tiny", input=[{"role": "user", "content": file_part}], max_output_tokens=4, stream=True
        )
    )
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == want and sum("Page Split" in d for d in deltas) == 2
    assert events[-1].response.usage.output_tokens == 8


def test_ocr_upload(base, tiny_model):
    data = png(6)
    body, ctype = multipart({"task": "free", "mode": "tiny", "max_tokens": "5"}, ("scan.png", data))
    status, _, result = request(base, "/v1/ocr", body, headers={"Content-Type": ctype})
    assert status == 200, result
    want = tiny_model.ocr(Image.open(io.BytesIO(data)), task="free", mode="tiny", max_new_tokens=5)
    (page,) = result["results"]
    assert page["text"] == want.text and page["source"] == "scan.png" and page["usage"] == want.usage
    body, ctype = multipart({"task": "free"}, ("notes.txt", b"not an image"))
    status, _, error = request(base, "/v1/ocr", body, headers={"Content-Type": ctype})
    assert_error(status, error, 400)


@pytest.mark.parametrize(
    "case",
    [
        "invalid_base64",
        "not_an_image",
        "truncated_png",
        "huge_dimensions",
        "wrong_model",
        "too_many_images",
        "oversize_body",
        "bad_key",
        "no_key",
        "bad_json",
        "local_path",
        "remote_disabled",
        "bad_temperature",
        "no_route",
    ],
)
def test_bad_inputs_get_openai_errors(base, case):
    image = png(7)
    msg = image_message(image)
    cases = {
        "invalid_base64": (
            400,
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-base64@@"}}
                        ],
                    }
                ]
            },
            None,
        ),
        "not_an_image": (400, {"messages": image_message(b"just some text, not pixels")}, None),
        "truncated_png": (400, {"messages": image_message(image[: len(image) // 2])}, None),
        "huge_dimensions": (400, {"messages": image_message(huge_png_header())}, None),
        "wrong_model": (404, {"model": "nope", "messages": msg}, "model_not_found"),
        "too_many_images": (400, {"messages": image_message(image, images=2)}, "too_many_images"),
        "oversize_body": (413, {"messages": image_message(b"x" * (1 << 20))}, "body_too_large"),
        "bad_key": (401, {"messages": msg}, "invalid_api_key"),
        "no_key": (401, {"messages": msg}, "invalid_api_key"),
        "bad_json": (400, b"{not json", None),
        "local_path": (
            400,
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]},
            "invalid_image_url",
        ),
        "remote_disabled": (
            400,
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
                    }
                ]
            },
            "remote_images_disabled",
        ),
        "bad_temperature": (400, {"messages": msg, "temperature": 9}, None),
        "no_route": (404, None, "not_found"),
    }
    status, body, code = cases[case]
    key = {"bad_key": "wrong-key", "no_key": None}.get(case, KEY)
    path = "/v1/nowhere" if case == "no_route" else "/v1/chat/completions"
    got, headers, error = request(base, path, body, key=key)
    assert_error(got, error, status, code)
    if case == "huge_dimensions":
        assert "pixels" in error["error"]["message"]
    # The server keeps serving.
    ok, _, reply = request(base, "/v1/chat/completions", {"messages": msg, "max_tokens": 2})
    assert ok == 200 and reply["usage"]["completion_tokens"] == 2


def test_eight_concurrent_clients_get_their_own_answers(client, tiny_model):
    jobs = [(png(20 + i), 3 + i % 4) for i in range(8)]
    want = [expected(tiny_model, data, tokens).text for data, tokens in jobs]
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        data, tokens = jobs[i]
        if i % 2:
            stream = client.chat.completions.create(
                model="tiny", messages=image_message(data), max_tokens=tokens, stream=True
            )
            got[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        else:
            r = client.chat.completions.create(model="tiny", messages=image_message(data), max_tokens=tokens)
            got[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [got.get(i) for i in range(8)] == want


def test_model_switching(base, client, second_ckpt, tiny_model):
    data = png(8)
    other = dsocr_mlx.load(str(second_ckpt), dtype="float32")
    r = client.chat.completions.create(model="tiny2", messages=image_message(data), max_tokens=TOKENS)
    assert r.model == "tiny2" and r.choices[0].message.content == expected(other, data).text
    assert request(base, "/health", key=None)[2]["model"] == "tiny2"
    r = client.chat.completions.create(model="tiny", messages=image_message(data), max_tokens=TOKENS)
    assert r.choices[0].message.content == expected(tiny_model, data).text
    assert request(base, "/health", key=None)[2]["model"] == "tiny"
    # A model that cannot load: 503, and the next request loads its own model again.
    status, _, error = request(base, "/v1/chat/completions", {"model": "broken", "messages": image_message(data)})
    assert_error(status, error, 503, "model_unavailable")
    assert request(base, "/health", key=None)[:2][0] == 503
    r = client.chat.completions.create(model="tiny", messages=image_message(data), max_tokens=TOKENS)
    assert r.choices[0].message.content == expected(tiny_model, data).text
    assert request(base, "/health", key=None)[2] == {
        "status": "ready",
        "model": "tiny",
        "busy": False,
        "running": 0,
        "queued": 0,
    }


def test_switching_disabled_limits_and_cors(tiny_ckpt, second_ckpt, tmp_path):
    with running_server(
        tiny_ckpt,
        {"tiny2": str(second_ckpt)},
        allow_model_switch=False,
        max_pdf_pages=1,
        max_tokens_cap=12,
        cors_origins=["http://app.test"],
    ) as url:
        status, _, error = request(url, "/v1/chat/completions", {"model": "tiny2", "messages": image_message(png())})
        assert_error(status, error, 400, "model_switch_disabled")
        assert [m["id"] for m in request(url, "/v1/models")[2]["data"]] == ["tiny"]
        body = {"messages": image_message(png()), "max_tokens": 5000, "detect_loops": False}
        assert request(url, "/v1/chat/completions", body)[2]["usage"]["completion_tokens"] == 12  # capped
        page = Image.new("RGB", (60, 80), "white")
        page.save(tmp_path / "two.pdf", "PDF", save_all=True, append_images=[page])
        pdf_part = {"type": "input_file", "file_data": data_url((tmp_path / "two.pdf").read_bytes(), "application/pdf")}
        status, _, error = request(url, "/v1/responses", {"input": [{"role": "user", "content": [pdf_part]}]})
        assert_error(status, error, 400)
        assert "more than the limit of 1" in error["error"]["message"] and "dsocr-" not in error["error"]["message"]
        status, headers, _ = request(
            url,
            "/v1/chat/completions",
            None,
            key=None,
            method="OPTIONS",
            headers={"Origin": "http://app.test", "Access-Control-Request-Method": "POST"},
        )
        assert status == 200 and headers["access-control-allow-origin"] == "http://app.test"


def open_stream(base: str, tokens: int) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=60)
    body = {"messages": image_message(png(9)), "max_tokens": tokens, "stream": True, "detect_loops": False}
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(body),
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    return conn, conn.getresponse()


def wait_for(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_disconnect_cancels_and_full_queue_gives_429(tiny_ckpt):
    from tests.test_hostile import CountingModel

    counting = []

    def slow(path):
        counting.append(CountingModel(dsocr_mlx.load(path, dtype="float32"), 0.05))
        return counting[-1]

    # One request at a time (max_batch 1): one running and one waiting fill a queue of one.
    with running_server(tiny_ckpt, loader=slow, max_queue=1, max_tokens_cap=1000, max_batch=1) as url:
        health = lambda: request(url, "/health", key=None)[2]  # noqa: E731
        # A client that leaves mid-stream frees the worker at its next token.
        conn, response = open_stream(url, 200)  # 200 tokens take 10 s or more
        assert response.status == 200 and b"data: " in response.readline()
        conn.close()
        status, _, reply = request(url, "/v1/chat/completions", {"messages": image_message(png()), "max_tokens": 2})
        assert status == 200 and counting[0].tokens[0] < 100  # the stream stopped long before its 200 tokens
        # One job running and one waiting fill a queue of one: the next request gets 429 with Retry-After.
        running = open_stream(url, 200)
        wait_for(lambda: health()["busy"])
        box = {}
        waiting = threading.Thread(target=lambda: box.update(r=open_stream(url, 200)))
        waiting.start()
        wait_for(lambda: health()["queued"] == 1)
        status, headers, error = request(url, "/v1/chat/completions", {"messages": image_message(png())})
        assert_error(status, error, 429, "queue_full")
        assert int(headers["Retry-After"]) >= 1
        running[0].close()
        waiting.join(30)
        box["r"][0].close()
        wait_for(lambda: not health()["busy"] and health()["queued"] == 0, 10)


def test_request_timeout(tiny_ckpt):
    def slow(path):
        return SlowModel(dsocr_mlx.load(path, dtype="float32"), 0.1)

    with running_server(tiny_ckpt, loader=slow, request_timeout=1) as url:
        status, _, error = request(url, "/v1/chat/completions", {"messages": image_message(png()), "max_tokens": 60})
        assert_error(status, error, 504, "timeout")


def test_remote_urls_resolving_to_private_addresses_are_refused(tiny_ckpt, monkeypatch):
    real = remote.resolve_host
    monkeypatch.setattr(
        remote, "resolve_host", lambda host, port: ["192.168.1.20"] if host == "intranet.test" else real(host, port)
    )
    with running_server(tiny_ckpt, allow_remote_images=True) as url:
        for target in [
            "http://127.0.0.1:9/a.png",
            "http://localhost/a.png",
            "http://10.1.2.3/a.png",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/a.png",
            "http://[::ffff:127.0.0.1]/a.png",
            "http://intranet.test/a.png",
            url + "/health",
        ]:
            message = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": target}}]}]
            status, _, error = request(url, "/v1/chat/completions", {"messages": message})
            assert_error(status, error, 400)
            assert "private or local" in error["error"]["message"], target


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server hook name
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", f"http://inside.test:{self.server.server_port}/image.png")
            self.end_headers()
            return
        body = png() if self.path == "/image.png" else b"x" * 300_000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_fetch_url_checks_every_hop_and_the_size():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_port
    # Pretend 127.0.0.1 is a public address for "outside.test"; "inside.test" stays private.
    hosts = {"outside.test": ["127.0.0.1"], "inside.test": ["127.0.0.2"]}
    kwargs = dict(max_bytes=100_000, timeout=5, resolve=lambda h, p: hosts[h], allowed=lambda a: a == "127.0.0.1")
    try:
        data = remote.fetch_url(f"http://outside.test:{port}/image.png", **kwargs)
        assert decode_image(data, 10**6).size == (120, 90)
        with pytest.raises(ValueError, match="private or local"):
            remote.fetch_url(f"http://outside.test:{port}/redirect", **kwargs)
        with pytest.raises(ValueError, match="larger than"):
            remote.fetch_url(f"http://outside.test:{port}/big", **kwargs)
        with pytest.raises(ValueError, match="data:, http: or https:"):
            remote.fetch_url("file:///etc/passwd", **kwargs)
    finally:
        httpd.shutdown()
    assert not remote.is_public_address("100.64.0.1") and not remote.is_public_address("fe80::1")
    assert remote.is_public_address("8.8.8.8")


def test_text_stream_holds_back_what_may_change():
    raw = (
        "  <|ref|>title<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n# Head\n<|ref|>image<|/ref|><|det|>[[5, 6, 7, 8]]"
        "<|/det|>\nbody text END more  "
    )
    stream = TextStream("markdown", stop=["END"])
    out, cut = "", raw.index("END")
    for i in range(0, cut, 3):
        piece = stream.feed(raw[: i + 3])  # the front end cuts the raw text at the stop string
        assert "<|" not in piece and "EN" not in piece
        out += piece
    out += stream.finish(final_text(raw[:cut].strip(), "markdown"))
    assert out == "\n# Head\n![](images/0.jpg)\n\nbody text"


def test_serve_command_builds_the_app_from_options_and_config(tiny_ckpt, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dsocr_mlx.cli import app

    calls = {}

    def run(server, sockets=None):  # records what the command built instead of serving
        c = server.config
        calls.update(app=c.app, host=c.host, port=c.port, timeout_graceful_shutdown=c.timeout_graceful_shutdown)
        for sock in sockets or []:
            sock.close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    config = tmp_path / "config.toml"
    config.write_text("[server]\nmax_queue = 3\nport = 9999\n")
    port = free_port()
    result = CliRunner().invoke(
        app, ["serve", "--model", str(tiny_ckpt), "--api-key", "k", "--port", str(port), "--config", str(config)]
    )
    assert result.exit_code == 0, result.output
    assert calls["host"] == "127.0.0.1" and calls["port"] == port  # loopback by default; options beat the file
    assert calls["app"].state.worker.max_queue == 3 and calls["app"].state.worker.default == "tiny"
    assert calls["app"].state.dsocr.limits["api_key"] == "k"
    assert calls["timeout_graceful_shutdown"] == 10  # running requests get 10 s on SIGTERM, then are cancelled
    assert calls["app"].state.dsocr.limits["web_ui"] is True and calls["app"].state.worker.max_batch == 4
    args = ["serve", "--model", str(tiny_ckpt), "--port", str(free_port()), "--config", str(config)]
    result = CliRunner().invoke(app, [*args, "--no-web-ui", "--max-batch", "2"])
    assert result.exit_code == 0, result.output
    assert calls["app"].state.dsocr.limits["web_ui"] is False and calls["app"].state.worker.max_batch == 2


def test_config_sampling_settings_change_what_a_chat_request_generates(tiny_ckpt, tiny_model, tmp_path):
    from dsocr_mlx.settings import load_settings

    config = tmp_path / "config.toml"
    sampling = "temperature = 5.0\nseed = 3\n"  # the tiny model's logits are steep: a high temperature
    config.write_text(f'[ocr]\nmode = "tiny"\nmax_new_tokens = 12\n{sampling}top_k = 5\nrepetition_penalty = 1.2\n')
    settings = load_settings(config)
    settings.model.update(path=str(tiny_ckpt), dtype="float32")
    data = png(30)
    without = expected(tiny_model, data, 12, temperature=5.0, seed=3)
    penalised = expected(tiny_model, data, 12, temperature=5.0, seed=3, top_k=5, repetition_penalty=1.2)
    assert penalised.token_ids != without.token_ids  # the two settings matter for this image
    app = create_app(settings)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=3, timeout=60)
        r = client.chat.completions.create(model="tiny", messages=image_message(data))
        assert r.choices[0].message.content == penalised.text and r.usage.completion_tokens == 12
    finally:
        srv.should_exit = True
        thread.join(30)


def test_ocr_upload_honours_the_sampling_fields(base, tiny_model):
    data = png(31)
    fields = {
        "task": "free",
        "mode": "tiny",
        "max_tokens": "10",
        "temperature": "2",
        "top_k": "8",
        "seed": "4",
        "repetition_penalty": "1.3",
    }
    body, ctype = multipart(fields, ("scan.png", data))
    status, _, result = request(base, "/v1/ocr", body, headers={"Content-Type": ctype})
    assert status == 200, result
    image = Image.open(io.BytesIO(data))
    want = tiny_model.ocr(
        image, task="free", mode="tiny", max_new_tokens=10, temperature=2.0, top_k=8, seed=4, repetition_penalty=1.3
    )
    greedy = tiny_model.ocr(image, task="free", mode="tiny", max_new_tokens=10)
    assert want.token_ids != greedy.token_ids
    assert result["results"][0]["text"] == want.text
    body, ctype = multipart({"temperature": "warm"}, ("scan.png", data))
    status, _, error = request(base, "/v1/ocr", body, headers={"Content-Type": ctype})
    assert_error(status, error, 400)
    assert error["error"]["param"] == "temperature"


def test_handlers_stand_alone():
    """A handler reads only the app's ServerState: it runs without a server, a model or a worker thread."""
    import asyncio
    from types import SimpleNamespace

    from dsocr_server import handlers
    from dsocr_server.catalog import ModelCatalog
    from dsocr_server.protocol import APIError
    from starlette.requests import Request

    from dsocr_mlx.options import OCROptions

    worker = SimpleNamespace(state="ready", resident="a", busy=False, running=set(), queued=0)
    limits = {"allow_model_switch": False, "allow_remote_images": False, "max_body_mb": 1}
    models = {"a": "a-path", "b": "b-path"}
    state = handlers.ServerState(OCROptions(), limits, models, "a", worker, ModelCatalog(models, "a"))
    app = SimpleNamespace(state=SimpleNamespace(dsocr=state))
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": [], "app": app})
    models = json.loads(asyncio.run(handlers.list_models(request)).body)
    assert [m["id"] for m in models["data"]] == ["a"]  # switching disabled: only the served model
    assert json.loads(asyncio.run(handlers.health(request)).body)["status"] == "ready"
    assert handlers.pick_model(state, None) == "a"
    for name, status in (("b", 400), ("c", 404)):
        with pytest.raises(APIError) as info:
            handlers.pick_model(state, name)
        assert info.value.status == status
    with pytest.raises(APIError, match="remote image URLs are disabled"):
        handlers.read_url(state, "https://example.com/a.png")
