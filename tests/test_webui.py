"""The web page's REST API (the community DeepSeek-OCR Web UI fork's paths and shapes) and its history, on a
real uvicorn on a loopback port (tests/test_server.py's ``running_server``) with a tiny checkpoint."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from dsocr_server import session  # noqa: E402
from dsocr_server.history import HistoryStore, UnsafePath  # noqa: E402
from PIL import Image

from dsocr_mlx import grounding, textstream  # noqa: E402
from dsocr_mlx.pipeline import GenerationResponse, OCRResult  # noqa: E402
from dsocr_mlx.processing import load_image  # noqa: E402
from tests.test_server import (  # noqa: F401 - second_ckpt is a fixture
    KEY,
    TOKENS,
    expected,
    huge_png_header,
    multipart,
    png,
    request,
    running_server,
    second_ckpt,
    wait_for,
)


class ScriptedModel:
    """A real model that "reads" every page as the raw text it is given (grounding spans and all), a few
    characters per token: realistic pages for screenshots, and hostile output for the sanitiser."""

    def __init__(self, model, pages: list[str], delay: float = 0.0):
        self.model, self.pages, self.delay = model, pages, delay

    def __getattr__(self, name):
        return getattr(self.model, name)

    def stream_ocr(self, image, prompt=None, options=None, *, page=None, **kwargs):
        pil = load_image(image[0] if isinstance(image, list) else image)
        raw = self.pages[(page or 0) % len(self.pages)].strip()
        stream, text, n = textstream.TextStream("markdown", page), "", 0
        for i in range(0, len(raw), 6):
            text, n = text + raw[i : i + 6], n + 1
            time.sleep(self.delay)
            yield GenerationResponse(raw[i : i + 6], 1, 50, 40, n, 100.0, 30.0, output=stream.feed(text))
        result = OCRResult(
            token_ids=[1] * n,
            raw_text=raw,
            text=textstream.markdown(raw, page),
            finish_reason="stop",
            prompt_tokens=50,
            image_tokens=40,
            blocks=grounding.parse_blocks(raw, pil.width, pil.height, page or 0),
            timings={"first_token": 0.2, "generation_tps": 30.0, "total": n * self.delay + 0.2},
            page=page,
            image=pil,
        )
        tail = stream.finish(result.output_text("markdown"))
        yield GenerationResponse("", 2, 50, 40, n, 100.0, 30.0, finish_reason="stop", output=tail, result=result)


def pdf_bytes(pages: int = 2) -> bytes:
    images = [Image.open(io.BytesIO(png(40 + i, (300, 400)))).convert("RGB") for i in range(pages)]
    buf = io.BytesIO()
    images[0].save(buf, "PDF", save_all=True, append_images=images[1:], resolution=72)
    return buf.getvalue()


def upload(base: str, data: bytes, fields: dict | None = None, name: str = "scan.png", query: str = "", **kw):
    body, ctype = multipart(fields or {}, (name, data))
    return request(base, "/api/ocr" + query, body, headers={"Content-Type": ctype, **kw.pop("headers", {})}, **kw)


def stream_events(base: str, data: bytes, fields: dict, name: str = "doc.pdf") -> list[dict]:
    status, _, text = upload(base, data, fields, name, query="?stream=1")
    assert status == 200, text
    return [json.loads(line) for line in text.splitlines() if line]


def raw_get(base: str, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    """A GET with the path sent exactly as written (urllib would normalise ``..`` and encodings)."""
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=30)
    conn.request("GET", path, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
    response = conn.getresponse()
    return response.status, response.read()


def visible(folder: Path) -> list[str]:
    """The entry folders and staging leftovers in a history folder."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.exists() else []


@pytest.fixture(scope="module")
def hist(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("history")


@pytest.fixture(scope="module")
def base(tiny_ckpt, second_ckpt, tiny_v2_ckpt, hist):  # noqa: F811 - the imported fixture
    models = {"tiny2": str(second_ckpt), "v2": str(tiny_v2_ckpt)}
    with running_server(tiny_ckpt, models, history_dir=str(hist)) as url:
        yield url


def test_ping_models_and_errors_in_the_forks_shape(base):
    status, _, body = request(base, "/api/ping")
    assert (status, body) == (200, {"status": "ok"})
    status, _, models = request(base, "/api/models")
    assert status == 200 and [m["key"] for m in models] == ["tiny", "tiny2", "v2"]
    assert models[0]["label"].startswith("DeepSeek-OCR · tiny") and models[0]["family"] == "deepseek-ocr"
    assert models[0]["modes"] == ["tiny", "small", "base", "large", "gundam"] and models[0]["default_mode"] == "tiny"
    assert models[2]["label"].startswith("DeepSeek-OCR-2 · v2") and models[2]["family"] == "deepseek-ocr-2"
    assert models[2]["modes"] == ["default"] and models[2]["default_mode"] == "default"  # [ocr] mode is OCR-1's
    # No key: 401, answered as FastAPI does ({"detail": ...}); Ollama's routes keep their own shape.
    status, _, body = request(base, "/api/history", key=None)
    assert status == 401 and "API key" in body["detail"] and body["code"] == "invalid_api_key"
    status, _, body = request(base, "/api/tags", key=None)
    assert status == 401 and isinstance(body["error"], str)
    status, _, body = request(base, "/api/history/" + "0" * 32)
    assert (status, body["detail"]) == (404, "History entry not found")


def test_two_models_side_by_side_and_every_history_route(base, hist, tiny_model, second_ckpt):  # noqa: F811
    import dsocr_mlx

    data = png(3)
    status, _, entry = upload(base, data, {"models": "tiny, tiny2", "prompt": "Free OCR."})
    assert status == 200, entry
    assert [v["model"] for v in entry["variants"]] == ["tiny", "tiny2"]  # the order asked
    other = dsocr_mlx.load(str(second_ckpt), dtype="float32")
    for variant, model in zip(entry["variants"], (tiny_model, other)):
        want = expected(model, data, prompt="<image>\nFree OCR.")
        assert variant["text_markdown"] == want.text and variant["text_raw"] == want.raw_text
        assert variant["finish_reason"] == want.finish_reason and variant["usage"]["completion_tokens"] == TOKENS
        assert variant["pages"][0]["image_size"] == [120, 90] and variant["metadata"]["options"]["mode"] == "tiny"
    assert entry["text_markdown"] == entry["variants"][0]["text_markdown"]  # the fork's top-level copy
    entry_id = entry["history_id"]
    assert [i["path"] for i in entry["input_images"]] == ["scan.png"]

    status, _, listed = request(base, "/api/history")
    assert (
        listed[0]["id"] == entry_id and listed[0]["models"] == ["tiny", "tiny2"] and listed[0]["filename"] == "scan.png"
    )
    assert request(base, f"/api/history/{entry_id}")[2] == entry

    for url, kind in (
        (entry["variants"][1]["bounding_image_url"], b"\xff\xd8"),
        (entry["variants"][1]["bounding_images"][0]["url"], b"\xff\xd8"),
        (entry["input_images"][0]["url"], b"\x89PNG"),
    ):
        status, body = raw_get(base, url)
        assert status == 200 and body.startswith(kind), url
    status, body = raw_get(base, f"/api/history/{entry_id}/download?model=tiny2")
    names = zipfile.ZipFile(io.BytesIO(body)).namelist()
    assert status == 200 and {"result.mmd", "result_ori.mmd", "result_with_boxes.jpg", "result.json"} <= {
        n.split("/", 1)[1] for n in names
    }
    folder = hist / entry_id
    assert (folder / "m1" / "result.mmd").read_text() == entry["variants"][1]["text_markdown"]
    assert raw_get(base, f"/api/history/{entry_id}/image/bounding?model=nope")[0] == 404
    assert raw_get(base, f"/api/history/{entry_id}/image/crop/images/0.jpg")[0] == 404  # no figure on a random page

    status, _, body = request(base, f"/api/history/{entry_id}", method="DELETE")
    assert (status, body) == (200, {"status": "deleted"})
    assert not folder.exists() and request(base, f"/api/history/{entry_id}")[0] == 404
    assert request(base, f"/api/history/{entry_id}", method="DELETE")[0] == 404


def test_a_pdf_streams_page_by_page(base, hist):
    events = stream_events(base, pdf_bytes(2), {"task": "free"})
    kinds = [e["type"] for e in events if e["type"] != "delta"]
    assert kinds == [
        "start",
        "variant_start",
        "page_start",
        "page_done",
        "page_start",
        "page_done",
        "variant_done",
        "done",
    ]
    assert events[0]["pages"] == 2 and events[0]["kind"] == "pdf"
    for index in (0, 1):
        start = next(e for e in events if e["type"] == "page_start" and e["index"] == index)
        assert start["page"] == index + 1 and start["image"].startswith("data:image/jpeg;base64,")
        done = next(e for e in events if e["type"] == "page_done" and e["index"] == index)
        text = "".join(e["text"] for e in events if e["type"] == "delta" and e["index"] == index)
        assert text == done["result"]["text_markdown"]  # the deltas add up to the page's final text
    entry = events[-1]
    assert [i["path"] for i in entry["input_images"]] == ["page-001.png", "page-002.png"]
    assert [b["path"] for b in entry["bounding_images"]] == ["boxes/1.jpg", "boxes/2.jpg"]
    assert {"doc.mmd", "doc_det.mmd", "doc_layouts.pdf", "doc.json"} <= {
        p.name for p in (hist / entry["history_id"] / "m0").iterdir()
    }
    assert entry["text_markdown"].count("<--- Page Split --->") == 2  # the official combined Markdown
    assert raw_get(base, entry["bounding_images"][1]["url"])[0] == 200


BAD_UPLOADS = [
    ("not an image", {}, b"hello, world", "scan.png", 400, "not a readable image"),
    ("empty", {}, b"", "scan.png", 400, "empty"),
    ("bomb", {}, huge_png_header(), "scan.png", 400, "pixels"),
    ("unknown model", {"models": "tiny,nope"}, None, "scan.png", 400, "unknown model key 'nope'"),
    ("prompt and task", {"prompt": "hi", "task": "free"}, None, "scan.png", 400, "either a prompt or a task"),
    ("mode of the other family", {"mode": "default"}, None, "scan.png", 400, "no mode 'default'"),
    ("model_options not JSON", {"model_options": "{"}, None, "scan.png", 400, "JSON object"),
    (
        "model_options unknown option",
        {"model_options": '{"tiny": {"reading_order": true}}'},
        None,
        "scan.png",
        400,
        "reading_order",
    ),
    ("model_options other model", {"model_options": '{"tiny2": {"mode": "tiny"}}'}, None, "scan.png", 400, "not among"),
    ("history_id", {"history_id": "x"}, None, "scan.png", 400, "history_id"),
    ("pages of an image", {"pages": "1-2"}, None, "scan.png", 400, "pages of a PDF"),
    ("page past the end", {"pages": "3"}, "pdf", "doc.pdf", 400, "past the end"),
    ("oversize", {}, b"\x89PNG" + b"\0" * (1 << 20), "scan.png", 413, "larger than"),
]


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=[c[0] for c in BAD_UPLOADS])
def test_bad_uploads_are_clear_errors_and_write_nothing(base, hist, case):
    _, fields, data, name, want, words = case
    before = visible(hist)
    data = png(5) if data is None else pdf_bytes(2) if data == "pdf" else data
    status, _, body = upload(base, data, fields, name)
    assert status == want and words in body["detail"], body
    assert "Traceback" not in body["detail"] and visible(hist) == before


def test_other_bad_requests(base, hist):
    before = visible(hist)
    status, _, body = request(base, "/api/ocr", {"file": "x"})  # JSON instead of a form
    assert status == 415 and "multipart/form-data" in body["detail"]
    body, ctype = multipart({"prompt": "x"}, ("x.png", png()))
    body = body.replace(b'name="file"', b'name="other"')
    status, _, reply = request(base, "/api/ocr", body, headers={"Content-Type": ctype})
    assert status == 400 and "'file'" in reply["detail"]
    two = multipart({}, ("a.png", png()))[0].replace(b"--dsocrboundary7a1--", b"") + multipart({}, ("b.png", png()))[0]
    status, _, reply = request(base, "/api/ocr", two, headers={"Content-Type": ctype})
    assert status == 400 and "one file" in reply["detail"]
    assert visible(hist) == before


TRAVERSALS = [
    "../../history.sqlite3",
    "..%2f..%2fhistory.sqlite3",
    "%2e%2e%2f%2e%2e%2fhistory.sqlite3",
    "%2e%2e/%2e%2e/history.sqlite3",
    "%252e%252e%252fhistory.sqlite3",
    "..%5c..%5chistory.sqlite3",
    "images\\..\\..\\history.sqlite3",
    "/etc/passwd",
    "%2fetc%2fpasswd",
    "result.mmd%00.jpg",
    "images/./0.jpg",
    ".hidden",
]


def test_paths_in_urls_never_leave_the_entry(base, hist):
    status, _, entry = upload(base, png(8), {})
    entry_id = entry["history_id"]
    before = visible(hist)
    for bad in TRAVERSALS:
        for route in ("image/crop", "image/input", "image/bounding"):
            status, body = raw_get(base, f"/api/history/{entry_id}/{route}/{bad}?model=tiny")
            assert status in (403, 404), (route, bad, status)
            assert b"SQLite" not in body and b"root:" not in body and b'"detail"' in body
    for bad_id in ("..", "..%2f..", "%2e%2e", "0" * 32, "ABC", entry_id.upper(), entry_id + "x"):
        status, body = raw_get(base, f"/api/history/{bad_id}/image/input/scan.png")
        assert status == 404 and b'"detail"' in body, bad_id
    status, _, _ = request(base, f"/api/history/{entry_id}/image/input/scan.png", key=None)
    assert status == 401
    assert visible(hist) == before


def test_a_model_failing_leaves_no_entry_and_the_other_model_its_output(tiny_ckpt, second_ckpt, tmp_path):  # noqa: F811
    import dsocr_mlx

    class FailsOnPageTwo:
        def __init__(self, model):
            self.model = model

        def __getattr__(self, name):
            return getattr(self.model, name)

        def stream_ocr(self, *args, page=None, **kwargs):
            if page == 1:
                raise ValueError("the page is too hard")
            yield from self.model.stream_ocr(*args, page=page, **kwargs)

    good = dsocr_mlx.load(str(tiny_ckpt), dtype="float32")

    def loader(path):
        return FailsOnPageTwo(good) if Path(path) == second_ckpt else good

    with running_server(tiny_ckpt, {"bad": str(second_ckpt)}, loader=loader, history_dir=str(tmp_path)) as url:
        status, _, body = upload(url, pdf_bytes(2), {"models": "bad", "task": "free"}, "doc.pdf")
        assert status == 400 and "too hard" in body["detail"]
        wait_for(lambda: visible(tmp_path) == [])  # the staging folder is gone: nothing half-written is left
        assert request(url, "/api/history")[2] == []
        status, _, entry = upload(url, pdf_bytes(2), {"models": "bad,tiny", "task": "free"}, "doc.pdf")
        assert status == 200 and [v["model"] for v in entry["variants"]] == ["tiny"]
        assert "too hard" in entry["metadata"]["warnings"][0]
        wait_for(lambda: visible(tmp_path) == [entry["history_id"]])


def test_a_client_that_leaves_mid_stream_frees_the_worker_and_leaves_nothing(tiny_ckpt, tiny_model, tmp_path):
    slow = ScriptedModel(tiny_model, ["word " * 400], delay=0.02)
    with running_server(tiny_ckpt, loader=lambda _: slow, history_dir=str(tmp_path)) as url:
        body, ctype = multipart({}, ("scan.png", png()))
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
        conn.request("POST", "/api/ocr?stream=1", body, {"Authorization": f"Bearer {KEY}", "Content-Type": ctype})
        response = conn.getresponse()
        lines = [json.loads(response.readline()) for _ in range(4)]
        assert lines[0]["type"] == "start" and lines[-1]["type"] in ("page_start", "delta")
        conn.close()
        health = lambda: request(url, "/health", key=None)[2]  # noqa: E731
        wait_for(lambda: not health()["busy"] and visible(tmp_path) == [], 20)
        assert request(url, "/api/history")[2] == []


def test_login_sets_a_session_cookie_the_guard_accepts(tiny_ckpt, tmp_path):
    with running_server(tiny_ckpt, history_dir=str(tmp_path)) as url:
        # The page's shell is public (it asks for the key); everything with data is not.
        for path in ("/", "/static/app.js", "/static/vendor/katex/katex.min.css"):
            status, headers, _ = request(url, path, key=None)
            assert status == 200 and "default-src 'self'" in headers["Content-Security-Policy"], path
            assert headers["X-Content-Type-Options"] == "nosniff"
        assert request(url, "/api/models", key=None)[0] == 401
        status, _, body = request(url, "/api/login", {"key": "wrong"}, key=None)
        assert status == 401 and body["detail"] == "incorrect API key"
        status, headers, body = request(url, "/api/login", {"key": KEY}, key=None)
        cookie = headers["Set-Cookie"]
        assert status == 200 and body["auth"] and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        jar = {"Cookie": cookie.split(";")[0]}
        assert request(url, "/api/models", key=None, headers=jar)[0] == 200
        forged = {"Cookie": f"{session.COOKIE}={session.make_token('another-key')}"}
        assert request(url, "/api/models", key=None, headers=forged)[0] == 401
        old = {"Cookie": f"{session.COOKIE}={session.make_token(KEY, time.time() - session.MAX_AGE - 1)}"}
        assert request(url, "/api/models", key=None, headers=old)[0] == 401
        # A page elsewhere cannot log the browser in, nor post with its cookie.
        status, _, _ = request(url, "/api/login", {"key": KEY}, key=None, headers={"Origin": "http://evil.test"})
        assert status == 403
        status, _, _ = upload(url, png(), {}, key=None, headers={**jar, "Origin": "http://evil.test"})
        assert status == 403
        status, headers, _ = request(url, "/api/logout", {}, key=None, headers=jar)
        assert status == 200 and "Max-Age=0" in headers["Set-Cookie"]
    with running_server(tiny_ckpt, api_key="", history_dir=str(tmp_path)) as url:  # no key: the page just works
        assert request(url, "/api/history", key=None)[0] == 200
        assert request(url, "/api/login", {}, key=None)[2] == {"status": "ok", "auth": False}


def test_the_page_has_no_inline_script_and_can_be_switched_off(tiny_ckpt, tmp_path):
    html = (Path(__file__).parent.parent / "server" / "static" / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\ssrc=)[^>]*>", html)  # no inline script
    assert not re.search(r"<[^>]*\son[a-z]+\s*=", html)  # no inline event handler
    with running_server(tiny_ckpt, web_ui=False, history_dir=str(tmp_path / "h")) as url:
        assert request(url, "/", key=None)[0] == 404 and request(url, "/api/ping")[0] == 404
        assert request(url, "/v1/models")[0] == 200
    assert not (tmp_path / "h").exists()  # nothing is created before the page is used


def test_deepseek_ocr_against_deepseek_ocr_2_each_in_its_own_mode(base):
    status, _, body = upload(base, png(6), {"models": "tiny,v2", "task": "free"})
    assert status == 400 and "DeepSeek-OCR-2 has no mode 'tiny'" in body["detail"]  # [ocr] mode = tiny
    options = json.dumps({"v2": {"mode": "default"}, "tiny": {"max_tokens": 3}})
    status, _, entry = upload(base, png(6), {"models": "tiny,v2", "task": "free", "model_options": options})
    assert status == 200, entry
    tiny, v2 = entry["variants"]
    assert (tiny["metadata"]["options"]["mode"], v2["metadata"]["options"]["mode"]) == ("tiny", "default")
    assert tiny["usage"]["completion_tokens"] <= 3 < v2["usage"]["completion_tokens"] == TOKENS
    assert v2["label"].startswith("DeepSeek-OCR-2")


# ---- the store alone ------------------------------------------------------------------------------------


def commit(store: HistoryStore, size: int = 10, name: str = "a.png") -> str:
    entry_id, staging = store.begin()
    (staging / "m0").mkdir()
    (staging / "m0" / "result.mmd").write_bytes(b"x" * size)
    store.commit(entry_id, staging, {"filename": name}, {"id": entry_id, "filename": name}, time.time())
    return entry_id


CRASH = """
import os, sys
from dsocr_server.history import HistoryStore
store = HistoryStore(sys.argv[1])
_, staging = store.begin()
(staging / "result.mmd").write_text("half")  # killed while writing
entry_id, staging = store.begin()
(staging / "result.mmd").write_text("whole")
staging.rename(store.folder / entry_id)  # killed between the rename and the commit
os._exit(1)
"""


def test_a_crash_leaves_nothing_visible_and_restart_finds_complete_entries(tmp_path):
    store = HistoryStore(tmp_path)
    kept = commit(store)
    store.close()
    done = subprocess.run(
        [sys.executable, "-c", CRASH, str(tmp_path)], cwd=Path(__file__).parent.parent, env={**os.environ}
    )
    assert done.returncode == 1 and len(visible(tmp_path)) == 3  # the entry, a staging folder, an orphan
    store = HistoryStore(tmp_path, orphan_grace=0)
    assert [e["id"] for e in store.entries()] == [kept]
    assert visible(tmp_path) == [kept]  # the leftovers of the dead process are swept on opening
    assert store.file(kept, "m0/result.mmd").read_bytes() == b"x" * 10


def test_retention_removes_the_oldest(tmp_path):
    store = HistoryStore(tmp_path, max_entries=2)
    ids = [commit(store) for _ in range(3)]
    assert [e["id"] for e in store.entries()] == ids[:0:-1] and visible(tmp_path) == sorted(ids[1:])
    store = HistoryStore(tmp_path / "bytes", max_bytes=2500)
    ids = [commit(store, 1000) for _ in range(4)]
    assert [e["id"] for e in store.entries()] == ids[:1:-1]
    big = commit(store, 5000)  # the newest entry stays even alone over the limit
    assert [e["id"] for e in store.entries()] == [big]


def test_store_paths_are_checked(tmp_path):
    store = HistoryStore(tmp_path)
    entry_id = commit(store)
    (tmp_path / entry_id / "m0" / "link.jpg").symlink_to("/etc/passwd")
    for bad in (
        "../x",
        "m0/../../history.sqlite3",
        "/etc/passwd",
        "m0\\result.mmd",
        "m0/%2e%2e",
        "m0/link.jpg",
        "",
        "m0//x",
    ):
        with pytest.raises(UnsafePath):
            store.file(entry_id, bad)
    with pytest.raises(FileNotFoundError):
        store.file(entry_id, "m0/missing.jpg")
    with pytest.raises(FileNotFoundError):
        store.file("../" + entry_id, "m0/result.mmd")
    assert store.get("x" * 32) is None and not store.delete("..") and store.delete(entry_id)
    assert not (tmp_path / entry_id).exists()


def test_session_tokens():
    token = session.make_token("k", now=1000)
    assert session.valid_token(token, "k", now=1000 + 60)
    assert not session.valid_token(token, "k", now=1000 + session.MAX_AGE)
    assert not session.valid_token(token, "other", now=1001)
    assert not session.valid_token(token.replace("v1.", "v2."), "k", now=1001)
    assert not session.valid_token("v1.99999999999999.ab", "k") and not session.valid_token("", "k")
    assert session.cookie_token(f"a=b; {session.COOKIE}={token}; c=d") == token
