"""The ``dsocr`` command on a tiny checkpoint: every command and format, many inputs, PDFs, config, errors."""

from __future__ import annotations

import json
import os
import shutil
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
    assert f"{bad}: " in result.stderr and "not a readable image" in result.stderr
    assert "2 of 3 input(s) done" in result.stderr and "Traceback" not in result.output
    assert (out / "page" / "result.mmd").is_file() and (out / "page-2" / "result.json").is_file()
    again = invoke("ocr", str(page), *BASE, "--out", str(out))
    assert again.exit_code == 1 and "--overwrite" in again.stderr
    assert invoke("ocr", str(page), *BASE, "--out", str(out), "--overwrite").exit_code == 0
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
    assert result.exit_code == 1
    assert "cannot load the model someone/missing-model" in result.stderr and "local folder" in result.stderr
    assert "Traceback" not in result.output


def test_interrupt_keeps_what_finished(env, page, tmp_path, monkeypatch):
    from dsocr_mlx import batch

    real = batch.run_items

    def interrupted(*args, **kwargs):
        gen = real(*args, **kwargs)
        yield next(gen)
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "run_items", interrupted)
    out = tmp_path / "out"
    result = invoke("ocr", str(page), str(page), *BASE, "--out", str(out))
    assert result.exit_code == 130 and "1 input(s) finished and kept" in result.stderr
    assert (out / "page" / "result.mmd").is_file()


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
