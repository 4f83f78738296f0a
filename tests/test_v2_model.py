"""DeepSeek-OCR-2 end to end on a tiny checkpoint: family detection, the public API and its mode rules,
both backends agreeing, and checkpoints storing some tensors in float32 (as the real upload does)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import dsocr_mlx
from dsocr_mlx.config import ModelArgs, detect_family
from dsocr_mlx.options import OptionError
from tests.conftest import assert_close
from tests.tolerances import BACKENDS

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def torch_v2_model(tiny_v2_ckpt):
    return dsocr_mlx.load(str(tiny_v2_ckpt), backend="torch", dtype="float32")


@pytest.fixture(scope="module")
def v2_inputs(tiny_v2_model, sample_image):
    return tiny_v2_model.prepare(sample_image, "<image>\nFree OCR.")


def test_family_is_read_from_config_json(tiny_v2_ckpt, tiny_ckpt, golden_dir):
    reference2 = json.loads((golden_dir.parent / "reference2" / "config.json").read_text())
    reference = json.loads((golden_dir.parent / "reference" / "config.json").read_text())
    assert detect_family(reference2) == "deepseek-ocr-2" and detect_family(reference) == "deepseek-ocr"
    args = ModelArgs.from_dict(reference2)
    assert args.is_v2 and args.clip is None and args.sam.output_channels == 896  # config.json says 1024 there
    # mlx-vlm's and transformers' own config names
    assert detect_family({"model_type": "deepseekocr_2"}) == "deepseek-ocr-2"
    assert detect_family({"architectures": ["DeepseekOcr2ForConditionalGeneration"]}) == "deepseek-ocr-2"
    mixed = dict(reference, architectures=["DeepseekOCR2ForCausalLM"])
    with pytest.raises(ValueError, match="mixes DeepSeek-OCR and DeepSeek-OCR-2"):
        detect_family(mixed)


def test_family_is_not_read_from_the_folder_name(tiny_v2_ckpt, tiny_ckpt, tmp_path):
    misleading = shutil.copytree(tiny_ckpt, tmp_path / "DeepSeek-OCR-2")
    assert dsocr_mlx.load(str(misleading), dtype="float32").family == "deepseek-ocr"


def test_layout_and_default_mode(tiny_v2_model, v2_inputs):
    assert tiny_v2_model.family == "deepseek-ocr-2"
    assert v2_inputs.images_spatial_crop.tolist() == [[3, 2]]  # 900 x 700: aspect 1.29, closest to 3:2
    assert v2_inputs.num_image_tokens == 257 + 6 * 144
    emb = tiny_v2_model.image_embeddings(v2_inputs)
    assert emb.shape == (257 + 6 * 144, 64)
    separator = np.array(tiny_v2_model.runtime.model.model.view_seperator)
    np.testing.assert_array_equal(emb[-1], separator)  # the last row; no image_newline anywhere
    assert not hasattr(tiny_v2_model.runtime.model.model, "image_newline")


def test_tiles_come_first_in_row_major_order(tiny_v2_model, v2_inputs):
    inner, runtime = tiny_v2_model.runtime.model.model, tiny_v2_model.runtime
    emb = tiny_v2_model.image_embeddings(v2_inputs)
    tile3 = np.array(inner.encode_view(runtime.pixels(v2_inputs.crop_pixels[3:4])).reshape(-1, 64))
    global_view = np.array(inner.encode_view(runtime.pixels(v2_inputs.global_pixels)).reshape(-1, 64))
    assert_close(emb[3 * 144 : 4 * 144], tile3, rtol=1e-5, atol=1e-5, what="tile 3")
    assert_close(emb[6 * 144 : 6 * 144 + 256], global_view, rtol=1e-5, atol=1e-5, what="global view")


def test_backends_agree(tiny_v2_model, torch_v2_model, v2_inputs, sample_image):
    assert torch_v2_model.family == "deepseek-ocr-2"
    assert_close(
        torch_v2_model.image_embeddings(v2_inputs),
        tiny_v2_model.image_embeddings(v2_inputs),
        **BACKENDS,
        what="image embeddings",
    )
    assert_close(torch_v2_model.prefill_logits(v2_inputs), tiny_v2_model.prefill_logits(v2_inputs), **BACKENDS)
    kwargs = dict(task="free", max_new_tokens=12, detect_loops=False)
    assert torch_v2_model.ocr(sample_image, **kwargs).token_ids == tiny_v2_model.ocr(sample_image, **kwargs).token_ids


def test_v1_modes_are_a_clear_error(tiny_v2_model, tiny_model, sample_image):
    with pytest.raises(OptionError, match="DeepSeek-OCR-2 has no mode 'gundam'.*only mode is 'default'") as e:
        tiny_v2_model.ocr(sample_image, mode="gundam", max_new_tokens=2)
    assert e.value.option == "mode"
    with pytest.raises(OptionError, match="DeepSeek-OCR has no mode 'default'"):
        tiny_model.ocr(sample_image, mode="default", max_new_tokens=2)
    with pytest.raises(OptionError, match="unknown mode 'huge'"):
        tiny_v2_model.ocr(sample_image, mode="huge", max_new_tokens=2)
    result = tiny_v2_model.ocr(sample_image, mode="default", max_new_tokens=2, ignore_eos=True)
    assert result.image_tokens == 257 + 6 * 144 and len(result.token_ids) == 2


def test_float32_tensors_in_the_checkpoint_load(tiny_v2_ckpt, tiny_v2_model, v2_inputs, tmp_path):
    """The real upload stores some tensors wider than bf16: the dtype comes from each tensor's header."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(tiny_v2_ckpt, tmp_path / "mixed")
    raw = load_file(str(folder / "model.safetensors"))
    wide = {k: v for k, v in raw.items() if "query_" in k or k.endswith("view_seperator")}
    assert wide
    reference = tiny_v2_model.prefill_logits(v2_inputs)
    for k, v in wide.items():
        raw[k] = v.float()
    save_file(raw, str(folder / "model.safetensors"))
    for backend in ("mlx", "torch"):
        model = dsocr_mlx.load(str(folder), backend=backend, dtype="float32")
        assert_close(model.prefill_logits(v2_inputs), reference, **BACKENDS, what=backend)


def test_a_mode_of_the_other_family_fails_before_the_weights_load(tiny_v2_ckpt, sample_image, tmp_path, monkeypatch):
    from PIL import Image
    from typer.testing import CliRunner

    from dsocr_mlx.backends.mlx import Runtime
    from dsocr_mlx.cli import app

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(Runtime, "load", classmethod(never))
    with pytest.raises(OptionError, match="DeepSeek-OCR-2 has no mode 'base'"):
        dsocr_mlx.load(str(tiny_v2_ckpt), options=dsocr_mlx.OCROptions(mode="base"))
    monkeypatch.setenv("DSOCR_CONFIG", str(tmp_path / "config.toml"))
    page = tmp_path / "page.png"
    Image.fromarray(sample_image).save(page)
    result = CliRunner().invoke(app, ["ocr", str(page), "--model", str(tiny_v2_ckpt), "--mode", "gundam"])
    assert result.exit_code == 2, result.output
    assert "--mode: DeepSeek-OCR-2 has no mode 'gundam'" in result.stderr and "only mode is 'default'" in result.stderr
