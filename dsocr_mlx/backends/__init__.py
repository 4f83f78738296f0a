"""Backends run the same model: MLX (Apple Silicon, or CPU on Linux) and PyTorch (CPU and CUDA).

Each is imported lazily, so ``import dsocr_mlx`` pulls in neither mlx nor torch. What a backend
provides is written down in :mod:`.runtime` (the :class:`Runtime` protocol).
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys

from .runtime import Backend, Runtime, RuntimeBase

__all__ = ["BACKENDS", "DTYPES", "Backend", "Runtime", "RuntimeBase", "check_dtype", "default_backend", "get_backend"]

BACKENDS = {
    "mlx": ("dsocr_mlx.backends.mlx", "mlx.core", 'pip install "dsocr-mlx"  (needs mlx, or mlx[cpu] on Linux)'),
    "torch": ("dsocr_mlx.backends.torch", "torch", 'pip install "dsocr-mlx[torch]"'),
}
DTYPES = ("float32", "float16", "bfloat16")


def _openblas_loaded() -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return "libopenblas" in maps.read()
    except OSError:
        return False


def default_backend(device: str | None = None) -> str:
    """What ``auto`` means on this host, or for ``device`` (naming a device picks PyTorch, whose option it is).

    MLX on Apple Silicon; PyTorch on CUDA hosts. On other hosts (CPU only) PyTorch when installed, unless
    OpenBLAS is preloaded into this process: that preload is what MLX's CPU backend needs (float32 matmul
    about 18x faster than its reference BLAS) and it slows PyTorch's own MKL kernels by 2 to 2.5x, so MLX
    is the faster of the two there. Measurements in README ("PyTorch backend").
    """
    if device not in (None, "auto"):
        return "torch"
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mlx"
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available() or not _openblas_loaded():
            return "torch"
    return "mlx"


def get_backend(name: str, device: str | None = None) -> Backend:
    """The backend module for ``name`` (or ``auto``), with a clear error when it or its framework is missing."""
    if name == "auto":
        name = default_backend(device)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: available backends are {', '.join(BACKENDS)}")
    module, framework, hint = BACKENDS[name]
    try:
        importlib.import_module(framework)
    except ImportError as e:
        package = framework.split(".")[0]
        raise ImportError(f"the {name} backend needs {package} ({e}); install it with: {hint}") from None
    return importlib.import_module(module)


def check_dtype(dtype: str | None) -> str | None:
    """``dtype``, or None for ``auto``/None (the backend picks); else a clear error."""
    if dtype in (None, "auto"):
        return None
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)} or auto")
    return dtype
