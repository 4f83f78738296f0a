"""The weight converter: round trips per dtype, quantized folders, mlx-vlm folders, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import dsocr_mlx
from dsocr_mlx.convert import convert

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from dsocr_mlx.backends.mlx.model import Model  # noqa: E402
from dsocr_mlx.backends.mlx.quantize import RECIPES, QuantizedSwitchLinear, QuantPolicy  # noqa: E402


@pytest.fixture(scope="module")
def inputs(tiny_model, sample_image):
    return tiny_model.prepare(sample_image, "<image>\nFree OCR.", mode="small")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_gives_the_same_logits(tiny_ckpt, tmp_path, inputs, dtype):
    out = convert(tiny_ckpt, tmp_path / dtype, dtype=dtype, show_progress=False)
    config = json.loads((out.path / "config.json").read_text())
    assert config["dsocr_format"] == "dsocr-mlx/1" and config["dsocr_dtype"] == dtype and "quantization" not in config
    assert (out.path / "README.md").is_file() and (out.path / "tokenizer.json").is_file()
    converted = dsocr_mlx.load(str(out.path))  # the folder's own dtype, no flags
    original = dsocr_mlx.load(str(tiny_ckpt), dtype=dtype)
    assert converted.dtype == dtype
    np.testing.assert_array_equal(converted.prefill_logits(inputs), original.prefill_logits(inputs))


def test_converted_weights_are_in_mlx_layout(tiny_ckpt, tmp_path, tiny_config):
    out = convert(tiny_ckpt, tmp_path / "c", dtype="float16", show_progress=False)
    weights = mx.load(str(out.path / "model.safetensors"))
    experts = weights["model.layers.1.mlp.experts.gate_proj.weight"]
    t = tiny_config.text
    assert experts.shape == (t.n_routed_experts, t.moe_intermediate_size, t.hidden_size)
    s = tiny_config.sam
    assert weights["model.sam_model.patch_embed.proj.weight"].shape == (s.width, 16, 16, 3)  # channels last
    assert all(v.dtype == mx.float16 for v in weights.values())
    assert not any(".experts.0." in k for k in weights)


@pytest.mark.parametrize("bits,group,mode", [(8, 64, "affine"), (4, 32, "affine"), (4, 32, "mxfp4")])
def test_quantized_folder_loads_without_flags(tiny_ckpt, tmp_path, inputs, tiny_model, bits, group, mode):
    out = convert(
        tiny_ckpt, tmp_path / f"q{bits}{mode}", q_bits=bits, q_group_size=group, q_mode=mode, show_progress=False
    )
    config = json.loads((out.path / "config.json").read_text())
    assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == group
    assert config["quantization"]["mode"] == mode
    model = dsocr_mlx.load(str(out.path))
    m = model.runtime.model
    layer = m.model.layers[1]
    assert isinstance(layer.mlp.experts.gate_proj, QuantizedSwitchLinear)
    assert isinstance(layer.mlp.shared_experts.up_proj, nn.QuantizedLinear)
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear) and isinstance(m.lm_head, nn.QuantizedLinear)
    assert isinstance(m.model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    # Kept in floating point: vision towers, projector, router, norms, layout embeddings, token embeddings.
    assert type(m.model.projector.layers) is nn.Linear and type(m.model.embed_tokens) is nn.Embedding
    assert type(m.model.sam_model.blocks[0].attn.qkv) is nn.Linear
    assert type(m.model.vision_model.transformer.layers[0].mlp.fc1) is nn.Linear
    # Stored float16; on MLX's CPU backend a quantized folder computes in float32 (fast and lossless there).
    float_dtype = mx.float32 if mx.default_device() == mx.cpu else mx.float16
    assert model.dtype == ("float32" if float_dtype == mx.float32 else "float16")
    assert layer.mlp.gate.weight.dtype == float_dtype and m.model.image_newline.dtype == float_dtype
    assert layer.input_layernorm.weight.dtype == float_dtype
    logits = model.prefill_logits(inputs)
    reference = tiny_model.prefill_logits(inputs)
    assert np.isfinite(logits).all() and np.corrcoef(logits, reference)[0, 1] > 0.9
    assert model.ocr(np.zeros((64, 64, 3), np.uint8), mode="tiny", max_new_tokens=3).token_ids


def test_policy_can_quantize_the_vision_linears(tiny_ckpt, tmp_path):
    out = convert(
        tiny_ckpt,
        tmp_path / "qv",
        q_bits=8,
        q_group_size=32,
        q_policy={"vision": True, "lm_head": False},
        show_progress=False,
    )
    m = dsocr_mlx.load(str(out.path)).runtime.model
    assert isinstance(m.model.sam_model.blocks[0].attn.qkv, nn.QuantizedLinear)
    assert type(m.lm_head) is nn.Linear
    with pytest.raises(ValueError, match="unknown quantization policy"):
        convert(tiny_ckpt, tmp_path / "bad", q_bits=4, q_policy={"router": True}, show_progress=False)


def test_shards_and_refusals(tiny_ckpt, tmp_path, inputs):
    out = convert(tiny_ckpt, tmp_path / "sharded", dtype="float32", max_shard_bytes=8_000_000, show_progress=False)
    assert len(out.files) > 2 and (out.path / "model.safetensors.index.json").is_file()
    np.testing.assert_array_equal(
        dsocr_mlx.load(str(out.path)).prefill_logits(inputs),
        dsocr_mlx.load(str(tiny_ckpt), dtype="float32").prefill_logits(inputs),
    )
    with pytest.raises(FileExistsError, match="not empty"):
        convert(tiny_ckpt, out.path, show_progress=False)
    with pytest.raises(ValueError, match="already converted"):
        convert(out.path, tmp_path / "again", show_progress=False)
    with pytest.raises(ValueError, match="quantization bits"):
        convert(tiny_ckpt, tmp_path / "q7", q_bits=7, show_progress=False)
    assert not (tmp_path / "q7").exists() or not any((tmp_path / "q7").iterdir())


def write_mlx_vlm_folder(src, dst, quantize_bits: int | None = None, high_bits: int | None = None):
    """A faithful copy of the layout mlx-vlm's converter writes for DeepSeek-OCR (``deepseekocr``) and
    DeepSeek-OCR-2 (``deepseekocr_2``): its sanitize rules, and its quantizer skipping the vision towers.
    With ``high_bits``, its ``--quant-predicate`` recipes: v_proj, down_proj, lm_head and embed_tokens at
    ``high_bits``, each layer's parameters recorded in config.json under mlx-vlm's own module names."""
    weights = {}
    for f in sorted(src.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    ours = Model.sanitize(weights)
    v2 = "model.qwen2_model.query_768.weight" in ours
    renamed = {}
    for key, value in ours.items():
        if key.startswith("model.qwen2_model.model.model."):
            key = "vision_model.qwen2_encoder." + key[len("model.qwen2_model.model.model.") :]
        elif key.startswith("model.qwen2_model.query_"):
            key = "vision_model.qwen2_encoder." + key[len("model.qwen2_model.") : -len(".weight")]
        elif key == "lm_head.weight":
            key = "language_model.lm_head.weight"
        elif key.startswith(("model.layers.", "model.embed_tokens.", "model.norm.")):
            key = "language_model." + key.replace(".mlp.experts.", ".mlp.switch_mlp.")
        elif key == "model.view_seperator":
            key = "view_separator"
        else:
            key = key[len("model.") :]
        renamed[key] = value.astype(mx.float16)
    config = json.loads((src / "config.json").read_text())
    config["text_config"] = config.pop("language_config")
    config["model_type"] = "deepseekocr_2" if v2 else "deepseekocr"
    if quantize_bits:
        # mlx-vlm quantizes every layer with to_quantized whose weight splits into groups of 64; for
        # deepseekocr_2 it skips the vision towers (SAM, the Qwen2 encoder) but not the projector.
        quantized, per_layer = {}, {}
        for key, value in renamed.items():
            path = key.rsplit(".", 1)[0]
            if (
                not (v2 and key.startswith(("sam_model.", "vision_model.")))
                and key.endswith(".weight")
                and value.ndim >= 2
                and value.shape[-1] % 64 == 0
                and "patch_embed" not in key
                and "net_" not in key
                and "neck" not in key
                and "patch_embedding" not in key
                and ".mlp.gate." not in key
            ):
                high = high_bits and any(p in path for p in ("v_proj", "down_proj", "lm_head", "embed_tokens"))
                bits = high_bits if high else quantize_bits
                w, scales, biases = mx.quantize(value, 64, bits)
                quantized.update({f"{path}.weight": w, f"{path}.scales": scales, f"{path}.biases": biases})
                if high_bits:
                    per_layer[path] = {"group_size": 64, "bits": bits}
            else:
                quantized[key] = value
        renamed = quantized
        config["quantization"] = {"group_size": 64, "bits": quantize_bits, **per_layer}
    dst.mkdir()
    mx.save_safetensors(str(dst / "model.safetensors"), renamed)
    (dst / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_mlx_vlm_folders_load_and_match(tiny_ckpt, tmp_path, inputs):
    reference = dsocr_mlx.load(str(tiny_ckpt), dtype="float16").prefill_logits(inputs)
    plain = dsocr_mlx.load(str(write_mlx_vlm_folder(tiny_ckpt, tmp_path / "vlm")), dtype="float16")
    np.testing.assert_array_equal(plain.prefill_logits(inputs), reference)
    q8 = dsocr_mlx.load(str(write_mlx_vlm_folder(tiny_ckpt, tmp_path / "vlm8", quantize_bits=8)))
    m = q8.runtime.model
    assert isinstance(m.model.embed_tokens, nn.QuantizedEmbedding)  # mlx-vlm quantizes embeddings too
    saved = mx.load(str(tmp_path / "vlm8" / "model.safetensors"))
    quantized = {
        p
        for p, mod in m.named_modules()
        if isinstance(mod, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear))
    }
    assert len(quantized) == sum(k.endswith(".scales") for k in saved)  # exactly where scales were saved
    assert np.corrcoef(q8.prefill_logits(inputs), reference)[0, 1] > 0.99
    # A converter of ours reads mlx-vlm folders as sources too.
    out = convert(tmp_path / "vlm", tmp_path / "from_vlm", dtype="float16", show_progress=False)
    np.testing.assert_array_equal(dsocr_mlx.load(str(out.path)).prefill_logits(inputs), reference)


@pytest.fixture(scope="module")
def v2_inputs(tiny_v2_model, sample_image):
    return tiny_v2_model.prepare(sample_image, "<image>\nFree OCR.")


def test_v2_mlx_vlm_folders_load_and_match(tiny_v2_ckpt, tmp_path, v2_inputs):
    reference = dsocr_mlx.load(str(tiny_v2_ckpt), dtype="float16").prefill_logits(v2_inputs)
    plain = dsocr_mlx.load(str(write_mlx_vlm_folder(tiny_v2_ckpt, tmp_path / "vlm")), dtype="float16")
    assert plain.family == "deepseek-ocr-2"
    np.testing.assert_array_equal(plain.prefill_logits(v2_inputs), reference)
    q4 = dsocr_mlx.load(str(write_mlx_vlm_folder(tiny_v2_ckpt, tmp_path / "vlm4", quantize_bits=4)))
    m = q4.runtime.model
    assert isinstance(m.model.layers[1].self_attn.q_proj, nn.QuantizedLinear)
    assert type(m.model.qwen2_model.model.model.layers[0].self_attn.q_proj) is nn.Linear  # vision kept float
    assert np.corrcoef(q4.prefill_logits(v2_inputs), reference)[0, 1] > 0.9


def test_v2_convert_round_trip_and_quantize(tiny_v2_ckpt, tiny_v2_model, tmp_path, v2_inputs):
    out = convert(tiny_v2_ckpt, tmp_path / "f32", dtype="float32", show_progress=False)
    converted = dsocr_mlx.load(str(out.path))
    assert converted.family == "deepseek-ocr-2"
    np.testing.assert_array_equal(converted.prefill_logits(v2_inputs), tiny_v2_model.prefill_logits(v2_inputs))
    q8 = convert(tiny_v2_ckpt, tmp_path / "q8", q_bits=8, q_group_size=32, show_progress=False)
    m = dsocr_mlx.load(str(q8.path)).runtime.model
    assert isinstance(m.model.layers[1].mlp.experts.gate_proj, QuantizedSwitchLinear)
    encoder = m.model.qwen2_model
    assert type(encoder.model.model.layers[0].mlp.gate_proj) is nn.Linear  # the Qwen2 encoder stays float
    assert type(encoder.query_768) is nn.Embedding and type(m.model.projector.layers) is nn.Linear
    qv = convert(
        tiny_v2_ckpt, tmp_path / "qv", q_bits=8, q_group_size=32, q_policy={"vision": True}, show_progress=False
    )
    m = dsocr_mlx.load(str(qv.path)).runtime.model
    assert isinstance(m.model.qwen2_model.model.model.layers[0].mlp.gate_proj, nn.QuantizedLinear)
    assert type(m.model.qwen2_model.query_1024) is nn.Embedding  # learnt queries are not linears


def test_unknown_layout_names_what_was_found(tiny_ckpt, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    mx.save_safetensors(str(folder / "weights.safetensors"), {"encoder.block.0.weight": mx.zeros((2, 2))})
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_bytes((tiny_ckpt / name).read_bytes())
    with pytest.raises(ValueError, match="unknown checkpoint layout.*encoder.block.0.weight"):
        dsocr_mlx.load(str(folder))


def test_script_shell_and_offline_upload(tiny_ckpt, tmp_path, monkeypatch):
    run = subprocess.run(
        [sys.executable, "-m", "dsocr_convert", str(tiny_ckpt), str(tmp_path / "s"), "--q-bits", "8"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and "quantized" in run.stdout and run.stderr == ""  # no bar when not a TTY
    again = subprocess.run(
        [sys.executable, "-m", "dsocr_convert", str(tiny_ckpt), str(tmp_path / "s")], capture_output=True, text=True
    )
    assert again.returncode == 1 and "not empty" in again.stderr and "Traceback" not in again.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="upload to|HF_HUB_OFFLINE"):
        convert(tiny_ckpt, tmp_path / "up", upload_repo="someone/dsocr-test", show_progress=False)
    assert (tmp_path / "up" / "config.json").is_file()  # the conversion itself is kept


# --------------------------------------------------------------------------------------------------------------
# Mixed-precision recipes
# --------------------------------------------------------------------------------------------------------------


def module_bits(model) -> dict[str, int]:
    return {p: m.bits for p, m in model.named_modules() if hasattr(m, "scales")}


def expected_recipe_bits(path: str, low: int, high: int) -> int:
    return low if ".mlp.experts." in path else high


@pytest.mark.parametrize("recipe", ["mixed_4_8", "mixed_3_6"])
def test_recipe_round_trip(tiny_ckpt, tmp_path, inputs, tiny_model, recipe):
    low, high = RECIPES[recipe]
    out = convert(tiny_ckpt, tmp_path / recipe, q_recipe=recipe, q_group_size=32, show_progress=False)
    q = json.loads((out.path / "config.json").read_text())["quantization"]
    assert q["recipe"] == recipe and q["bits"] == low and q["group_size"] == 32 and q["mode"] == "affine"
    assert q["policy"] == {"experts": low, "attention": high, "mlp": high, "lm_head": high} | {
        "embed_tokens": False,
        "vision": False,
    }
    saved = {}
    for f in out.files:
        saved.update(mx.load(str(out.path / f)))
    quantized = sorted(k[: -len(".scales")] for k in saved if k.endswith(".scales"))
    entries = sorted(k for k in q if isinstance(q[k], dict) and k != "policy")
    assert entries == quantized  # every quantized module records its own parameters, as mlx-lm's recipes do
    for path in quantized:
        assert q[path] == {"group_size": 32, "bits": expected_recipe_bits(path, low, high), "mode": "affine"}
    model = dsocr_mlx.load(str(out.path))  # no flags
    bits = module_bits(model.runtime.model)
    assert sorted(bits) == quantized and all(b == expected_recipe_bits(p, low, high) for p, b in bits.items())
    m = model.runtime.model
    assert isinstance(m.model.layers[1].mlp.experts.down_proj, QuantizedSwitchLinear)
    assert type(m.model.embed_tokens) is nn.Embedding and type(m.model.sam_model.blocks[0].attn.qkv) is nn.Linear
    assert np.corrcoef(model.prefill_logits(inputs), tiny_model.prefill_logits(inputs))[0, 1] > 0.9


def test_recipe_sizes_order(tiny_ckpt, tmp_path):
    sizes = {}
    for name, kwargs in [
        ("q4", {"q_bits": 4}),
        ("mixed_3_6", {"q_recipe": "mixed_3_6"}),
        ("mixed_4_8", {"q_recipe": "mixed_4_8"}),
        ("q8", {"q_bits": 8}),
    ]:
        out = convert(tiny_ckpt, tmp_path / name, q_group_size=32, show_progress=False, **kwargs)
        sizes[name] = sum((out.path / f).stat().st_size for f in out.files)
    assert sizes["mixed_3_6"] < sizes["mixed_4_8"] < sizes["q8"] and sizes["q4"] < sizes["mixed_4_8"]


def test_recipe_overrides_and_refusals(tiny_ckpt, tmp_path):
    out = convert(
        tiny_ckpt,
        tmp_path / "qv",
        q_recipe="mixed_4_6",
        q_group_size=32,
        q_policy={"vision": True, "lm_head": False, "attention": 5},
        show_progress=False,
    )
    m = dsocr_mlx.load(str(out.path)).runtime.model
    assert m.model.sam_model.blocks[0].attn.qkv.bits == 6  # vision at the recipe's high bits
    assert type(m.lm_head) is nn.Linear and m.model.layers[1].self_attn.q_proj.bits == 5
    assert m.model.layers[1].mlp.experts.gate_proj.bits == 4
    custom = convert(
        tiny_ckpt, tmp_path / "custom", q_bits=4, q_group_size=32, q_policy={"attention": 8}, show_progress=False
    )
    q = json.loads((custom.path / "config.json").read_text())["quantization"]
    assert q["model.layers.1.self_attn.q_proj"]["bits"] == 8 and q["lm_head"]["bits"] == 4
    m = dsocr_mlx.load(str(custom.path)).runtime.model
    assert m.model.layers[1].self_attn.o_proj.bits == 8 and m.model.layers[1].mlp.experts.up_proj.bits == 4
    with pytest.raises(ValueError, match="unknown quantization recipe 'mixed_9_9': choose one of mixed_2_6"):
        convert(tiny_ckpt, tmp_path / "bad", q_recipe="mixed_9_9", show_progress=False)
    with pytest.raises(ValueError, match="not both"):
        convert(tiny_ckpt, tmp_path / "bad", q_recipe="mixed_4_8", q_bits=4, show_progress=False)
    with pytest.raises(ValueError, match="only the affine mode"):
        convert(tiny_ckpt, tmp_path / "bad", q_recipe="mixed_4_8", q_mode="mxfp4", show_progress=False)
    with pytest.raises(ValueError, match="need the affine mode"):
        QuantPolicy(bits=4, group_size=32, mode="mxfp4", attention=8)
    with pytest.raises(ValueError, match="attention: quantization bits"):
        QuantPolicy(attention=7)
    assert not (tmp_path / "bad").exists()


def test_v2_recipe_keeps_the_qwen2_encoder_float(tiny_v2_ckpt, tmp_path, v2_inputs, tiny_v2_model):
    out = convert(tiny_v2_ckpt, tmp_path / "m", q_recipe="mixed_4_8", q_group_size=32, show_progress=False)
    model = dsocr_mlx.load(str(out.path))
    m = model.runtime.model
    assert m.model.layers[1].mlp.experts.gate_proj.bits == 4 and m.model.layers[1].self_attn.q_proj.bits == 8
    assert not any(p.startswith("model.qwen2_model") for p in module_bits(m))
    assert np.corrcoef(model.prefill_logits(v2_inputs), tiny_v2_model.prefill_logits(v2_inputs))[0, 1] > 0.9
    qv = convert(tiny_v2_ckpt, tmp_path / "qv", q_recipe="mixed_4_8", q_group_size=32, q_policy={"vision": True})
    m = dsocr_mlx.load(str(qv.path)).runtime.model
    assert m.model.qwen2_model.model.model.layers[0].mlp.gate_proj.bits == 8


def test_mixed_folders_of_mlx_vlm_load_from_their_shapes(tiny_ckpt, tmp_path, inputs):
    reference = dsocr_mlx.load(str(tiny_ckpt), dtype="float16").prefill_logits(inputs)
    folder = write_mlx_vlm_folder(tiny_ckpt, tmp_path / "vlm36", quantize_bits=3, high_bits=6)
    model = dsocr_mlx.load(str(folder))  # its per-layer entries name mlx-vlm's modules: the shapes tell
    bits = module_bits(model.runtime.model)
    assert bits["model.layers.1.self_attn.v_proj"] == 6 and bits["model.layers.1.self_attn.q_proj"] == 3
    assert bits["lm_head"] == 6 and bits["model.embed_tokens"] == 6 and len(set(bits.values())) == 2
    high = ("v_proj", "down_proj", "lm_head", "embed_tokens")
    assert all(b == (6 if any(h in p for h in high) else 3) for p, b in bits.items())
    assert np.corrcoef(model.prefill_logits(inputs), reference)[0, 1] > 0.9


def test_recipe_on_the_command_line(tiny_ckpt, tmp_path):
    for spelling in (["--q-recipe", "mixed_4_8"], ["-q", "--quant-predicate", "mixed_3_6"]):
        dst = tmp_path / spelling[-1]
        run = subprocess.run(
            [sys.executable, "-m", "dsocr_convert", str(tiny_ckpt), str(dst), "--q-group-size", "32", *spelling],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr
        assert f"{spelling[-1]} quantized" in run.stdout
        assert json.loads((dst / "config.json").read_text())["quantization"]["recipe"] == spelling[-1]
    bad = subprocess.run(
        [sys.executable, "-m", "dsocr_convert", str(tiny_ckpt), str(tmp_path / "x"), "--q-recipe", "mixed_5_5"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "unknown quantization recipe" in bad.stderr and "Traceback" not in bad.stderr
