"""Shared fixtures: a tiny random checkpoint with every branch switched on, and the golden cases."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from dsocr_mlx.random_checkpoint import tiny_args, tiny_v2_args, write_random_checkpoint

GOLDEN_ENV = "DSOCR_GOLDEN"  # ../shared/golden; set by .ci/run
GOLDEN_CKPT_ENV = "DSOCR_GOLDEN_CKPT"  # the checkpoint its make_checkpoint.py writes
GOLDEN2_ENV = "DSOCR_GOLDEN2"  # ../shared/golden2 (DeepSeek-OCR-2); set by .ci/run
GOLDEN2_CKPT_ENV = "DSOCR_GOLDEN2_CKPT"


def max_mean_diff(a, b) -> str:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return f"max |d| {d.max():.3g}, mean |d| {d.mean():.3g}"


def assert_close(actual, expected, rtol: float, atol: float, what: str = "") -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    assert np.allclose(actual, expected, rtol=rtol, atol=atol), f"{what}: {max_mean_diff(actual, expected)}"


@pytest.fixture(scope="session")
def tiny_config():
    return tiny_args()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_config) -> Path:
    """The tiny checkpoint in the original HF layout, sharded so the index path is exercised."""
    return write_random_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny", tiny_config, seed=3, max_shard_bytes=12_000_000
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    pytest.importorskip("mlx.core")
    import dsocr_mlx

    return dsocr_mlx.load(str(tiny_ckpt), backend="mlx", dtype="float32")


@pytest.fixture(scope="session")
def tiny_v2_ckpt(tmp_path_factory) -> Path:
    """A tiny DeepSeek-OCR-2 checkpoint in the original HF layout (real view sizes and query tables)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt2") / "tiny-v2", tiny_v2_args(), seed=5)


@pytest.fixture(scope="session")
def tiny_v2_model(tiny_v2_ckpt):
    pytest.importorskip("mlx.core")
    import dsocr_mlx

    return dsocr_mlx.load(str(tiny_v2_ckpt), backend="mlx", dtype="float32")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    value = os.environ.get(GOLDEN_ENV)
    if not value:
        pytest.skip(f"{GOLDEN_ENV} is not set (point it at ../shared/golden)")
    path = Path(value)
    if not (path / "cases.json").is_file():
        pytest.fail(f"{GOLDEN_ENV}={value} but {path / 'cases.json'} is missing")
    return path


@pytest.fixture(scope="session")
def golden_ckpt(golden_dir) -> Path:
    value = os.environ.get(GOLDEN_CKPT_ENV)
    if not value or not (Path(value) / "model.safetensors").is_file():
        pytest.fail(f"{GOLDEN_CKPT_ENV} must name the checkpoint written by {golden_dir}/make_checkpoint.py")
    return Path(value)


@pytest.fixture(scope="session")
def golden2_dir() -> Path:
    value = os.environ.get(GOLDEN2_ENV)
    if not value:
        pytest.skip(f"{GOLDEN2_ENV} is not set (point it at ../shared/golden2)")
    path = Path(value)
    if not (path / "cases.json").is_file():
        pytest.fail(f"{GOLDEN2_ENV}={value} but {path / 'cases.json'} is missing")
    return path


@pytest.fixture(scope="session")
def golden2_ckpt(golden2_dir) -> Path:
    value = os.environ.get(GOLDEN2_CKPT_ENV)
    if not value or not (Path(value) / "model.safetensors").is_file():
        pytest.fail(f"{GOLDEN2_CKPT_ENV} must name the checkpoint written by {golden2_dir}/make_checkpoint.py")
    return Path(value)


@pytest.fixture(scope="session")
def sample_image() -> np.ndarray:
    """A deterministic 900x700 RGB page-like image (wider than a tile, so gundam mode tiles it)."""
    rng = np.random.default_rng(0)
    img = np.full((700, 900, 3), 235, np.uint8)
    for _ in range(40):
        y, x = rng.integers(0, 680), rng.integers(0, 800)
        img[y : y + 12, x : x + rng.integers(20, 100)] = rng.integers(0, 80)
    return img
