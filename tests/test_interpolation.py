"""Position-table resampling: the numpy matrices against torch.nn.functional.interpolate, and the MLX
resize helpers on the golden checkpoint's tables against the official interpolations in interp.npz."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pytest

from dsocr_mlx.interpolation import bicubic_antialias_matrix, linear_matrix, relative_position_index
from tests.tolerances import INTERPOLATION_ATOL

# (in, out): the real grids (SAM 64 -> 32/40/80, CLIP 16 -> 8/10/20, rel-pos 127 -> 63/79/159, windowed 27),
# plus odd up- and downsampling sizes.
PAIRS = [
    (64, 32),
    (64, 40),
    (64, 80),
    (16, 8),
    (16, 10),
    (16, 20),
    (127, 63),
    (127, 79),
    (127, 159),
    (27, 27),
    (7, 3),
    (5, 13),
    (33, 17),
    (10, 31),
    (100, 99),
    (99, 100),
    (64, 48),
    (64, 96),
    (3, 200),
    (200, 3),
    (255, 127),
    (13, 6),
    (5, 1),
    (1, 4),
    (64, 64),
]
PAIR_IDS = [f"{a}to{b}" for a, b in PAIRS]


def _max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ---------------------------------------------------------------------------------------------------
# The matrices against PyTorch


@pytest.mark.parametrize("in_size, out_size", PAIRS, ids=PAIR_IDS)
def test_bicubic_antialias_matches_torch(in_size, out_size):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(in_size * 1000 + out_size)
    table = rng.standard_normal((4, in_size, in_size)).astype(np.float32)
    expected = F.interpolate(
        torch.from_numpy(table)[None], size=(out_size, out_size), mode="bicubic", antialias=True, align_corners=False
    )[0].numpy()
    m = bicubic_antialias_matrix(in_size, out_size)
    assert m.shape == (out_size, in_size) and m.dtype == np.float32
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)
    m = m.astype(np.float64)
    ours = m @ table.astype(np.float64) @ m.T  # rows, then columns
    err = _max_abs(ours, expected)
    assert err <= INTERPOLATION_ATOL, f"bicubic {in_size}->{out_size}: max |d| {err:.3g}"


@pytest.mark.parametrize("in_size, out_size", PAIRS, ids=PAIR_IDS)
def test_linear_matches_torch(in_size, out_size):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(in_size * 1000 + out_size + 7)
    table = rng.standard_normal((1, 16, in_size)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(table), size=out_size, mode="linear", align_corners=False)[0].numpy()
    m = linear_matrix(in_size, out_size)
    assert m.shape == (out_size, in_size) and m.dtype == np.float32
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)
    ours = table[0].astype(np.float64) @ m.astype(np.float64).T
    err = _max_abs(ours, expected)
    assert err <= INTERPOLATION_ATOL, f"linear {in_size}->{out_size}: max |d| {err:.3g}"


def test_bicubic_antialias_is_not_plain_bicubic():
    # Guards the test above against a weak reference: the AA kernel differs a lot from plain bicubic here.
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, 64, 64)).astype(np.float32))
    aa = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
    plain = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", antialias=False, align_corners=False)
    m = bicubic_antialias_matrix(64, 32)
    ours = m @ x[0, 0].numpy() @ m.T
    assert _max_abs(ours, aa[0, 0].numpy()) <= INTERPOLATION_ATOL < _max_abs(ours, plain[0, 0].numpy())


def test_relative_position_index():
    idx = relative_position_index(4)
    assert idx.shape == (4, 4)
    assert idx[0].tolist() == [3, 2, 1, 0] and idx[3].tolist() == [6, 5, 4, 3]
    assert (np.diag(idx) == 3).all()


# ---------------------------------------------------------------------------------------------------
# The MLX helpers on the golden checkpoint's tables


@pytest.fixture(scope="module")
def golden_make(golden_dir):
    """golden/make_checkpoint.py as a module (its init table, std and bf16 rounding)."""
    spec = importlib.util.spec_from_file_location("golden_make_checkpoint", golden_dir / "make_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _golden_tensor(make, name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """One tensor of the golden checkpoint, regenerated exactly as make_checkpoint.py's main() does."""
    _, mean, std = make.init_rule(name)
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, key])))
    a = rng.standard_normal(shape, dtype=np.float32)
    s = make.std_of(std, shape)
    if s != 1.0:
        a *= np.float32(s)
    if mean != 0.0:
        a += np.float32(mean)
    bits = make.to_bf16_bits(a)
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.fixture(scope="module")
def golden_tables(golden_dir, golden_make):
    manifest = json.loads((golden_dir / "manifest.json").read_text())["checkpoint"]
    seed = manifest["seed"]
    assert seed == 7
    shapes = {
        "model.sam_model.pos_embed": (1, 64, 64, 768),
        "model.vision_model.embeddings.position_embedding.weight": (257, 1024),
        "model.sam_model.blocks.2.attn.rel_pos_h": (127, 64),
    }
    listed = golden_make.real_shapes(manifest["layers"])
    assert {k: listed[k] for k in shapes} == shapes
    return {k: _golden_tensor(golden_make, k, s, seed) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def interp(golden_dir):
    with np.load(golden_dir / "interp.npz") as data:
        return dict(data)


@pytest.fixture(scope="module")
def interp_stats(golden_dir):
    return json.loads((golden_dir / "manifest.json").read_text())["interp_stats"]


def test_interp_npz_keys(interp):
    expected = {f"sam_pos_{g}_ch0_8" for g in (32, 40, 80)} | {f"clip_pos_{g}_ch0_8" for g in (8, 10, 20)}
    expected |= {f"sam_block2_rel_pos_h_q{q}" for q in (32, 40, 80)}
    assert set(interp) == expected


def test_regenerated_tables_are_the_golden_ones(golden_tables, interp):
    # get_abs_pos passes the CLIP class row through unchanged, so it pins the regeneration recipe bit for bit.
    clip = golden_tables["model.vision_model.embeddings.position_embedding.weight"]
    for g in (8, 10, 20):
        np.testing.assert_array_equal(interp[f"clip_pos_{g}_ch0_8"][0], clip[0, :8])
    assert golden_tables["model.sam_model.pos_embed"].std() == pytest.approx(0.5, rel=0.01)


@pytest.mark.parametrize("size", [32, 40, 80])
def test_sam_pos_embed_resize(golden_tables, interp, interp_stats, size):
    mx = pytest.importorskip("mlx.core")
    from dsocr_mlx.backends.mlx.sam import resize_grid_table

    table = mx.array(golden_tables["model.sam_model.pos_embed"][0])
    out = resize_grid_table(table, size)
    assert out.shape == (size, size, 768) and out.dtype == mx.float32
    ours = np.array(out)
    err = _max_abs(ours[..., :8], interp[f"sam_pos_{size}_ch0_8"])
    assert err <= INTERPOLATION_ATOL, f"SAM pos_embed 64->{size}: max |d| {err:.3g}"
    stats = interp_stats[f"sam_pos_{size}"]
    assert stats["shape"] == [1, size, size, 768]
    assert float(ours.mean()) == pytest.approx(stats["mean"], abs=1e-6)
    assert float(ours.std()) == pytest.approx(stats["std"], rel=1e-5)
    assert float(np.abs(ours).max()) == pytest.approx(stats["absmax"], abs=INTERPOLATION_ATOL)


def test_sam_pos_embed_native_size_unchanged(golden_tables):
    mx = pytest.importorskip("mlx.core")
    from dsocr_mlx.backends.mlx.sam import resize_grid_table

    table = golden_tables["model.sam_model.pos_embed"][0]
    np.testing.assert_array_equal(np.array(resize_grid_table(mx.array(table), 64)), table)


@pytest.mark.parametrize("size", [8, 10, 20])
def test_clip_position_embedding_resize(golden_tables, interp, interp_stats, size):
    mx = pytest.importorskip("mlx.core")
    from dsocr_mlx.backends.mlx.sam import resize_grid_table

    table = golden_tables["model.vision_model.embeddings.position_embedding.weight"]
    grid = mx.array(table[1:].reshape(16, 16, 1024))
    resized = np.array(resize_grid_table(grid, size)).reshape(size * size, 1024)
    ours = np.concatenate([table[:1], resized], axis=0)  # CLS row first, unchanged (official get_abs_pos)
    err = _max_abs(ours[:, :8], interp[f"clip_pos_{size}_ch0_8"])
    assert err <= INTERPOLATION_ATOL, f"CLIP positions 16->{size}: max |d| {err:.3g}"
    stats = interp_stats[f"clip_pos_{size}"]
    assert stats["shape"] == [1, size * size + 1, 1024]
    assert float(ours.mean()) == pytest.approx(stats["mean"], abs=1e-6)
    assert float(ours.std()) == pytest.approx(stats["std"], rel=1e-5)


@pytest.mark.parametrize("size", [8, 10, 20])
def test_clip_embeddings_module_uses_resized_positions(golden_tables, interp, size):
    """The CLIP embedding layer adds exactly the official table: zero patches and a zero class token."""
    mx = pytest.importorskip("mlx.core")
    from dsocr_mlx.backends.mlx.clip import Embeddings
    from dsocr_mlx.config import ClipArgs

    emb = Embeddings(ClipArgs())
    emb.position_embedding.weight = mx.array(golden_tables["model.vision_model.embeddings.position_embedding.weight"])
    emb.class_embedding = mx.zeros((1024,))
    out = np.array(emb(mx.zeros((1, size, size, 1024))))
    assert out.shape == (1, size * size + 1, 1024)
    err = _max_abs(out[0, :, :8], interp[f"clip_pos_{size}_ch0_8"])
    assert err <= INTERPOLATION_ATOL, f"CLIP embeddings at {size}x{size}: max |d| {err:.3g}"


@pytest.mark.parametrize("q", [32, 40, 80])
def test_sam_rel_pos_resize(golden_tables, interp, interp_stats, q):
    mx = pytest.importorskip("mlx.core")
    from dsocr_mlx.backends.mlx.sam import relative_positions

    table = golden_tables["model.sam_model.blocks.2.attn.rel_pos_h"]
    out = relative_positions(mx.array(table), q)
    assert out.shape == (q, q, 64)
    ours = np.array(out)
    err = _max_abs(ours[..., :8], interp[f"sam_block2_rel_pos_h_q{q}"])
    assert err <= INTERPOLATION_ATOL, f"rel_pos_h 127->{2 * q - 1} gathered at q={q}: max |d| {err:.3g}"
    stats = interp_stats[f"sam_block2_rel_pos_h_q{q}"]
    assert stats["shape"] == [q, q, 64]
    assert float(ours.mean()) == pytest.approx(stats["mean"], abs=1e-6)
    assert float(ours.std()) == pytest.approx(stats["std"], rel=1e-5)


def test_sam_rel_pos_native_size_is_a_gather(golden_tables):
    mx = pytest.importorskip("mlx.core")
    from dsocr_mlx.backends.mlx.sam import relative_positions

    table = golden_tables["model.sam_model.blocks.2.attn.rel_pos_h"]
    out = np.array(relative_positions(mx.array(table), 64))
    np.testing.assert_array_equal(out, table[relative_position_index(64)])
    assert (out[5, 5] == table[63]).all() and (out[0, 63] == table[0]).all() and (out[63, 0] == table[126]).all()
