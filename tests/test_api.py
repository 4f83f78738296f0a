"""The public API and its shells: lazy imports, loading errors, greedy OCR, the CLI on a tiny checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

import dsocr_mlx
from dsocr_mlx.cli import app
from dsocr_mlx.grounding import clean_markdown


def test_import_pulls_in_neither_mlx_nor_torch():
    code = "import sys, dsocr_mlx, dsocr_mlx.cli; print(sorted(m for m in ('mlx', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_convert_and_server_install_under_unique_names():
    import dsocr_convert
    import dsocr_server

    assert dsocr_convert.__file__.endswith("convert/__init__.py")
    assert dsocr_server.__file__.endswith("server/__init__.py")


def test_unknown_backend_and_dtype_are_clear_errors(tiny_ckpt):
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        dsocr_mlx.load(str(tiny_ckpt), backend="cuda")
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        dsocr_mlx.load(str(tiny_ckpt), dtype="int8")


def test_missing_folder_and_offline_hub_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face repo id"):
        dsocr_mlx.load(str(tmp_path / "nope" / "deeper" / "x"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="pass the local folder"):
        dsocr_mlx.load("someone/not-downloaded-model")


def test_folder_without_weights_or_config(tmp_path, tiny_ckpt):
    with pytest.raises(FileNotFoundError, match="config.json"):
        dsocr_mlx.load(str(tmp_path))
    shutil.copy(tiny_ckpt / "config.json", tmp_path / "config.json")
    shutil.copy(tiny_ckpt / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        dsocr_mlx.load(str(tmp_path))


def test_bad_config_is_named(tmp_path, tiny_ckpt):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    config = json.loads((bad / "config.json").read_text())
    config["projector_config"]["n_embed"] = 99
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="n_embed 99 must equal"):
        dsocr_mlx.load(str(bad))


def test_ocr_is_deterministic_and_reports_usage(tiny_model, sample_image):
    a = tiny_model.ocr(sample_image, "<image>\nFree OCR.", mode="small", max_new_tokens=6)
    b = tiny_model.ocr(sample_image, "<image>\nFree OCR.", mode="small", max_new_tokens=6)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 6
    assert a.image_tokens == 111 and a.prompt_tokens == 111 + 1 + 4
    assert a.raw_text == tiny_model.tokenizer.decode(a.token_ids).strip()
    hot = [
        tiny_model.ocr(
            sample_image, "<image>\nFree OCR.", mode="small", max_new_tokens=6, temperature=5.0, seed=s
        ).token_ids
        for s in (1, 1, 2)
    ]
    assert hot[0] == hot[1] and hot[0] != hot[2] and hot[0] != a.token_ids


def test_image_input_types_agree(tiny_model, sample_image, tmp_path):
    from PIL import Image

    path = tmp_path / "page.png"
    Image.fromarray(sample_image).save(path)
    ids = [
        tiny_model.prepare(x, mode="base").global_pixels
        for x in (sample_image, str(path), path.read_bytes(), Image.open(path))
    ]
    assert all(np.array_equal(ids[0], other) for other in ids[1:])


def test_clean_markdown_follows_the_official_post_processing():
    raw = (
        "<|ref|>title<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n# Hello\n"
        "<|ref|>image<|/ref|><|det|>[[10, 20, 30, 40]]<|/det|>\n"
        "<|ref|>text<|/ref|><|det|>[[5, 5, 9, 9]]<|/det|>\na \\coloneqq b"
    )
    assert clean_markdown(raw) == "\n# Hello\n![](images/0.jpg)\n\n\na := b"


def test_cli_make_test_model_and_version(tmp_path):
    runner = CliRunner()
    assert dsocr_mlx.__version__ in runner.invoke(app, ["--version"]).output
    out = tmp_path / "m"
    result = runner.invoke(app, ["make-test-model", str(out), "--size", "tiny", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    again = runner.invoke(app, ["make-test-model", str(out)])
    assert again.exit_code == 1 and "exists; pass --overwrite" in again.output


def test_auto_dtype_on_mlx_follows_the_device(tiny_ckpt):
    pytest.importorskip("mlx.core")
    import mlx.core as mx

    model = dsocr_mlx.load(str(tiny_ckpt), backend="mlx", dtype="auto")
    on_cpu = mx.default_device() == mx.cpu
    assert model.device == ("cpu" if on_cpu else "gpu")
    assert model.dtype == ("float32" if on_cpu else "float16")  # MLX's CPU half-precision matmul is slow
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        dsocr_mlx.load(str(tiny_ckpt), dtype="float8")
