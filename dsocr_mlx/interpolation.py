"""Resampling matrices for the position tables, matching ``torch.nn.functional.interpolate``.

The official code resizes SAM's and CLIP's absolute position tables with bicubic interpolation,
``antialias=True, align_corners=False`` (PyTorch's separable antialiased kernel, a = -0.5, support
widened when downsampling), and SAM's relative-position tables with ``mode="linear"``. Both are
linear maps along each axis, so each is a small ``(out, in)`` matrix that any backend can apply.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


def _f32(x: float) -> float:
    return float(np.float32(x))


def _bicubic_aa_filter(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@lru_cache(maxsize=64)
def bicubic_antialias_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``(out_size, in_size)`` float32 weights of PyTorch's antialiased bicubic resize along one axis."""
    # PyTorch computes the scale and window centres in the input's precision (float32): round like it.
    scale = _f32(in_size / out_size)
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    m = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = _f32(scale * (i + 0.5))
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = np.array([_bicubic_aa_filter((j - center + 0.5) * inv_scale) for j in range(lo, hi)])
        total = w.sum()
        if total != 0.0:
            w = w / total
        m[i, lo:hi] = w
    return m.astype(np.float32)


@lru_cache(maxsize=64)
def linear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``(out_size, in_size)`` float32 weights of ``F.interpolate(mode="linear", align_corners=False)``."""
    scale = _f32(in_size / out_size)
    m = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        src = max(_f32(scale * (i + 0.5) - 0.5), 0.0)
        i0 = min(int(math.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        frac = src - i0
        m[i, i0] += 1.0 - frac
        m[i, i1] += frac
    return m.astype(np.float32)


def relative_position_index(size: int) -> np.ndarray:
    """``(size, size)`` indices into a ``2*size-1`` relative-position table: ``q - k + size - 1``."""
    coords = np.arange(size)
    return (coords[:, None] - coords[None, :] + size - 1).astype(np.int32)
