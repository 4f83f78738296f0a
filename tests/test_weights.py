"""The checkpoint layout (against the real tensor list), strict validation and MLX loading, sharding,
deterministic random checkpoints and the MLX sanitize step."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from dsocr_mlx.config import ModelArgs
from dsocr_mlx.processing import round_to_bfloat16
from dsocr_mlx.random_checkpoint import (
    full_args,
    full_v2_args,
    random_tensor,
    tiny_args,
    tiny_v2_args,
    write_random_checkpoint,
)
from dsocr_mlx.weights import (
    CHECKPOINT_KEYS,
    CONV_WEIGHTS,
    check_checkpoint,
    checkpoint_shapes,
    safetensors_shapes,
    weight_files,
)

mx = pytest.importorskip("mlx.core")
from mlx.utils import tree_flatten  # noqa: E402

from dsocr_mlx.backends.mlx import load_model  # noqa: E402
from dsocr_mlx.backends.mlx.model import Model  # noqa: E402

SEED = 11


# ---------------------------------------------------------------------------------------------------
# The layout against the real checkpoint


def _read_weights_tsv(path: Path) -> dict[str, tuple[int, ...]]:
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == ["name", "shape", "dtype"]
    out = {}
    for line in lines[1:]:
        name, shape, dtype = line.split("\t")
        assert dtype == "bfloat16", name
        assert name not in out, f"{name} listed twice"
        out[name] = tuple(int(d) for d in shape.split("x"))
    return out


@pytest.fixture(scope="module")
def reference_dir(golden_dir) -> Path:
    return golden_dir.parent / "reference"


def test_checkpoint_shapes_equal_real_tensor_list(reference_dir):
    real = _read_weights_tsv(reference_dir / "weights.tsv")
    ours = checkpoint_shapes(ModelArgs.from_file(reference_dir / "config.json"))
    assert len(real) == 2710
    assert sum(math.prod(s) for s in real.values()) == 3_336_106_240
    assert sorted(set(ours) - set(real)) == [], "names the real checkpoint does not have"
    assert sorted(set(real) - set(ours)) == [], "real tensors we do not expect"
    wrong = {k: (ours[k], real[k]) for k in real if ours[k] != real[k]}
    assert wrong == {}
    assert ours == real


def test_checkpoint_shapes_of_golden_checkpoint(golden_dir):
    # make_checkpoint.py keeps decoder layers 0-2 of the real list: 892 tensors, 1,232,623,360 parameters.
    manifest = json.loads((golden_dir / "manifest.json").read_text())["checkpoint"]
    shapes = checkpoint_shapes(full_args(manifest["layers"]))
    assert len(shapes) == manifest["n_tensors"] == 892
    assert sum(math.prod(s) for s in shapes.values()) == manifest["n_params"] == 1_232_623_360


def test_checkpoint_shapes_equal_real_v2_tensor_list(reference_dir):
    real = _read_weights_tsv(reference_dir.parent / "reference2" / "weights.tsv")
    ours = checkpoint_shapes(ModelArgs.from_file(reference_dir.parent / "reference2" / "config.json"))
    assert len(real) == 2707
    assert sum(math.prod(s) for s in real.values()) == 3_389_119_360
    assert sorted(set(ours) - set(real)) == [], "names the real checkpoint does not have"
    assert sorted(set(real) - set(ours)) == [], "real tensors we do not expect"
    assert ours == real
    assert ours == checkpoint_shapes(full_v2_args())


def test_checkpoint_shapes_of_golden2_checkpoint():
    # golden2's make_checkpoint.py keeps decoder layers 0-2: 889 tensors, 1,285,636,480 parameters.
    shapes = checkpoint_shapes(full_v2_args(3))
    assert len(shapes) == 889
    assert sum(math.prod(s) for s in shapes.values()) == 1_285_636_480


def test_every_tensor_is_documented():
    patterns = [re.compile(p.replace("N", r"\d+").replace("E", r"\d+")) for p, _ in CHECKPOINT_KEYS]
    v1, v2 = checkpoint_shapes(full_args()), checkpoint_shapes(full_v2_args())
    used = set()
    for name in {**v1, **v2}:
        hits = [i for i, p in enumerate(patterns) if p.fullmatch(name)]
        assert hits, f"{name} matches no CHECKPOINT_KEYS pattern"
        used.update(hits)
    assert used == set(range(len(patterns))), "some CHECKPOINT_KEYS patterns match no tensor"
    assert set(CONV_WEIGHTS) <= set(v1) and set(CONV_WEIGHTS) - set(v1) == set()
    assert all(len(v1[k]) == 4 for k in CONV_WEIGHTS)
    assert all(len(v2[k]) == 4 for k in CONV_WEIGHTS if k in v2)
    assert not any(k.startswith(("model.vision_model.", "model.image_newline")) for k in v2)


def test_tiny_v2_layout_has_every_branch():
    shapes = checkpoint_shapes(tiny_v2_args())
    assert shapes["model.qwen2_model.query_768.weight"] == (144, 32)
    assert shapes["model.qwen2_model.query_1024.weight"] == (256, 32)
    assert shapes["model.qwen2_model.model.model.layers.1.self_attn.k_proj.weight"] == (16, 32)  # 2 of 4 heads
    assert shapes["model.qwen2_model.model.model.layers.1.self_attn.k_proj.bias"] == (16,)
    assert "model.qwen2_model.model.model.layers.1.self_attn.o_proj.bias" not in shapes
    assert shapes["model.sam_model.net_3.weight"][0] == 32  # net_3 to the encoder width
    assert shapes["model.projector.layers.weight"] == (64, 32)


def test_tiny_layout_has_every_branch():
    shapes = checkpoint_shapes(tiny_args())
    assert shapes["model.sam_model.blocks.0.attn.rel_pos_h"] == (27, 16)  # windowed: 2 * 14 - 1
    assert shapes["model.sam_model.blocks.1.attn.rel_pos_h"] == (127, 16)  # global: 2 * 64 - 1
    assert "model.layers.0.mlp.gate_proj.weight" in shapes  # dense first layer
    assert shapes["model.layers.1.mlp.gate.weight"] == (8, 64)  # MoE router
    assert shapes["model.layers.1.mlp.experts.7.down_proj.weight"] == (64, 32)
    assert shapes["model.layers.1.mlp.shared_experts.up_proj.weight"] == (32, 64)


# ---------------------------------------------------------------------------------------------------
# check_checkpoint


def test_check_checkpoint_accepts_exact_match():
    expected = checkpoint_shapes(tiny_args())
    check_checkpoint(dict(expected), expected, "tiny")  # no exception


def test_check_checkpoint_names_each_problem():
    expected = checkpoint_shapes(tiny_args())
    found = dict(expected)
    del found["model.sam_model.blocks.1.attn.rel_pos_w"]
    found["model.vision_model.post_layernorm.weight"] = (48,)
    found["model.projector.layers.weight"] = (64, 95)
    with pytest.raises(ValueError) as e:
        check_checkpoint(found, expected, "the checkpoint in /x")
    msg = str(e.value)
    assert "the checkpoint in /x" in msg
    assert "1 missing tensor(s)" in msg and "model.sam_model.blocks.1.attn.rel_pos_w" in msg
    assert "1 unexpected tensor(s)" in msg and "model.vision_model.post_layernorm.weight" in msg
    assert "model.projector.layers.weight has shape (64, 95)" in msg and "(64, 96)" in msg


def test_check_checkpoint_counts_many_misshaped():
    expected = checkpoint_shapes(tiny_args())
    found = {k: tuple(d + 1 for d in v) for k, v in expected.items()}
    with pytest.raises(ValueError, match=rf"and {len(expected) - 3} more misshaped"):
        check_checkpoint(found, expected, "tiny")


# ---------------------------------------------------------------------------------------------------
# Strict MLX loading


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """An unsharded tiny checkpoint."""
    return write_random_checkpoint(tmp_path_factory.mktemp("weights") / "tiny", tiny_args(), seed=SEED)


def _tampered_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    weights = mx.load(str(dst / "model.safetensors"))
    edit(weights)
    (dst / "model.safetensors").unlink()
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "pt"})
    return dst


def _params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}


def test_load_model_fills_every_parameter(ckpt):
    model = load_model(ckpt, tiny_args(), dtype="float32")
    raw = mx.load(str(ckpt / "model.safetensors"))
    sanitized = Model.sanitize(raw)
    params = _params(model)
    not_filled, unused = sorted(set(params) - set(sanitized)), sorted(set(sanitized) - set(params))
    assert not not_filled and not unused, f"not filled: {not_filled[:5]}; unused: {unused[:5]}"
    for name, value in params.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, np.array(sanitized[name].astype(mx.float32)), err_msg=name)
    # Tensors the model initialises to zeros or ones really come from the file.
    assert np.abs(params["model.image_newline"]).max() > 0
    assert np.abs(params["model.sam_model.pos_embed"]).max() > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_load_model_dtype(ckpt, dtype):
    model = load_model(ckpt, tiny_args(), dtype=dtype)
    target = getattr(mx, dtype)
    params = dict(tree_flatten(model.parameters()))
    # Routed experts may stay float32 where MLX has no half-precision gathered matmul (its CPU backend).
    assert {v.dtype for k, v in params.items() if ".mlp.experts." not in k} == {target}
    assert {v.dtype for k, v in params.items() if ".mlp.experts." in k} <= {target, mx.float32}


def test_load_model_missing_tensor(ckpt, tmp_path):
    name = "model.sam_model.blocks.1.attn.rel_pos_h"
    bad = _tampered_copy(ckpt, tmp_path / "missing", lambda w: w.pop(name))
    with pytest.raises(ValueError, match="missing") as e:
        load_model(bad, tiny_args(), dtype="float32")
    assert name in str(e.value) and str(bad) in str(e.value)


def test_load_model_missing_expert(ckpt, tmp_path):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    bad = _tampered_copy(ckpt, tmp_path / "missing_expert", lambda w: w.pop(name))
    with pytest.raises(ValueError, match="missing") as e:
        load_model(bad, tiny_args(), dtype="float32")
    assert name in str(e.value)


def test_load_model_unexpected_tensor(ckpt, tmp_path):
    name = "model.vision_model.post_layernorm.weight"
    bad = _tampered_copy(ckpt, tmp_path / "extra", lambda w: w.update({name: mx.ones((48,), mx.bfloat16)}))
    with pytest.raises(ValueError, match="unexpected") as e:
        load_model(bad, tiny_args(), dtype="float32")
    assert name in str(e.value)


def test_load_model_misshaped_tensor(ckpt, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"
    bad = _tampered_copy(ckpt, tmp_path / "shape", lambda w: w.update({name: w[name][:, :63]}))
    with pytest.raises(ValueError) as e:
        load_model(bad, tiny_args(), dtype="float32")
    assert f"{name} has shape (64, 63)" in str(e.value) and "(64, 64)" in str(e.value)


def test_load_model_config_mismatch(ckpt):
    with pytest.raises(ValueError, match="missing") as e:
        load_model(ckpt, tiny_args(layers=3), dtype="float32")
    assert "model.layers.2." in str(e.value)


def test_tampered_copy_loads_when_unchanged(ckpt, tmp_path):
    # The rewrite itself (mlx.core.save_safetensors) must not be what the tests above detect.
    same = _tampered_copy(ckpt, tmp_path / "same", lambda w: None)
    model = load_model(same, tiny_args(), dtype="float32")
    sanitized = Model.sanitize(mx.load(str(same / "model.safetensors")))
    assert {k for k, _ in tree_flatten(model.parameters())} == set(sanitized)


# ---------------------------------------------------------------------------------------------------
# Sharding and weight files


def test_sharded_loads_like_unsharded(tmp_path):
    args = tiny_args()
    single = write_random_checkpoint(tmp_path / "single", args, seed=SEED)
    sharded = write_random_checkpoint(tmp_path / "sharded", args, seed=SEED, max_shard_bytes=100_000)
    files = weight_files(sharded)
    assert len(files) > 5 and all(f.name.startswith("model-") for f in files)
    assert weight_files(single) == [single / "model.safetensors"]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(checkpoint_shapes(args))
    assert index["metadata"]["total_size"] == 2 * sum(math.prod(s) for s in checkpoint_shapes(args).values())
    assert safetensors_shapes(files) == checkpoint_shapes(args)
    assert safetensors_shapes([single / "model.safetensors"]) == checkpoint_shapes(args)

    raw_sharded = {}
    for f in files:
        raw_sharded.update(mx.load(str(f)))
    raw_single = mx.load(str(single / "model.safetensors"))
    assert set(raw_sharded) == set(raw_single)
    for k, v in raw_single.items():
        assert mx.array_equal(v, raw_sharded[k]).item(), k

    a = _params(load_model(single, args, dtype="float32"))
    b = _params(load_model(sharded, args, dtype="float32"))
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_conftest_checkpoint_is_sharded(tiny_ckpt):
    assert (tiny_ckpt / "model.safetensors.index.json").is_file()
    assert len(weight_files(tiny_ckpt)) > 1
    assert (tiny_ckpt / "tokenizer.json").is_file() and (tiny_ckpt / "config.json").is_file()


def test_weight_files_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors") as e:
        weight_files(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_weight_files_index_names_missing_shard(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors") as e:
        weight_files(tmp_path)
    assert "model-00001" not in str(e.value)


@pytest.mark.parametrize("text", ["{broken", '{"metadata": {}}'])
def test_weight_files_bad_index(tmp_path, text):
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match="not a valid safetensors index"):
        weight_files(tmp_path)


def test_weight_files_without_index_sorted(tmp_path):
    for name in ("b.safetensors", "a.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [f.name for f in weight_files(tmp_path)] == ["a.safetensors", "b.safetensors"]


@pytest.mark.parametrize("data", [b"", b"\xff" * 8 + b"{}", (10).to_bytes(8, "little") + b"not json!!"])
def test_safetensors_shapes_bad_file(tmp_path, data):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="not a readable safetensors file") as e:
        safetensors_shapes([path])
    assert str(path) in str(e.value)


# ---------------------------------------------------------------------------------------------------
# Random checkpoints


def test_random_checkpoint_is_deterministic(tmp_path, ckpt):
    again = write_random_checkpoint(tmp_path / "again", tiny_args(), seed=SEED)
    other = write_random_checkpoint(tmp_path / "other", tiny_args(), seed=SEED + 1)
    first = (ckpt / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == first
    assert (again / "config.json").read_bytes() == (ckpt / "config.json").read_bytes()
    other_bytes = (other / "model.safetensors").read_bytes()
    assert len(other_bytes) == len(first) and other_bytes != first
    assert safetensors_shapes([other / "model.safetensors"]) == checkpoint_shapes(tiny_args())
    # Every tensor differs, not just one.
    a, b = mx.load(str(ckpt / "model.safetensors")), mx.load(str(other / "model.safetensors"))
    assert all(not mx.array_equal(a[k], b[k]).item() for k in a)


def test_random_tensor_matches_file(ckpt):
    raw = mx.load(str(ckpt / "model.safetensors"))
    names = ("model.sam_model.pos_embed", "model.layers.1.mlp.experts.5.gate_proj.weight", "lm_head.weight")
    for name in names:
        expected = round_to_bfloat16(random_tensor(name, tuple(raw[name].shape), SEED))
        np.testing.assert_array_equal(np.array(raw[name].astype(mx.float32)), expected, err_msg=name)


def test_random_checkpoint_refuses_existing_folder(ckpt):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_random_checkpoint(ckpt, tiny_args(), seed=SEED)


def test_random_checkpoint_config_reads_back(ckpt):
    assert ModelArgs.from_file(ckpt / "config.json") == tiny_args()


# ---------------------------------------------------------------------------------------------------
# Model.sanitize


def test_sanitize_stacks_experts_and_transposes_convs():
    rng = np.random.default_rng(0)
    experts = {e: rng.standard_normal((4, 3)).astype(np.float32) for e in (2, 0, 1)}  # out of order
    conv = rng.standard_normal((5, 2, 3, 3)).astype(np.float32)  # OIHW
    other = rng.standard_normal((7, 6)).astype(np.float32)
    weights = {f"model.layers.1.mlp.experts.{e}.up_proj.weight": mx.array(v) for e, v in experts.items()}
    weights["model.layers.1.mlp.experts.0.down_proj.weight"] = mx.array(other[:3, :4])
    weights["model.sam_model.net_2.weight"] = mx.array(conv)
    weights["model.layers.1.mlp.gate.weight"] = mx.array(other)
    weights["model.layers.1.mlp.shared_experts.up_proj.weight"] = mx.array(other)
    out = Model.sanitize(weights)
    assert set(out) == {
        "model.layers.1.mlp.experts.up_proj.weight",
        "model.layers.1.mlp.experts.down_proj.weight",
        "model.sam_model.net_2.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight",
    }
    stacked = np.array(out["model.layers.1.mlp.experts.up_proj.weight"])
    assert stacked.shape == (3, 4, 3)  # (E, out, in)
    for e in range(3):
        np.testing.assert_array_equal(stacked[e], experts[e])
    assert out["model.layers.1.mlp.experts.down_proj.weight"].shape == (1, 3, 4)
    ohwi = np.array(out["model.sam_model.net_2.weight"])
    assert ohwi.shape == (5, 3, 3, 2)
    np.testing.assert_array_equal(ohwi, conv.transpose(0, 2, 3, 1))
    assert ohwi[4, 1, 2, 0] == conv[4, 0, 1, 2]
    np.testing.assert_array_equal(np.array(out["model.layers.1.mlp.gate.weight"]), other)


def test_sanitize_transposes_every_conv():
    shapes = checkpoint_shapes(tiny_args())
    weights = {k: mx.zeros(shapes[k]) for k in CONV_WEIGHTS}
    out = Model.sanitize(weights)
    for k in CONV_WEIGHTS:
        o, i, h, w = shapes[k]
        assert tuple(out[k].shape) == (o, h, w, i), k


def test_sanitize_names_missing_expert():
    weights = {f"model.layers.3.mlp.experts.{e}.gate_proj.weight": mx.zeros((2, 2)) for e in (0, 2)}
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.experts\.1\.gate_proj\.weight"):
        Model.sanitize(weights)
