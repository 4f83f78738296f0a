"""dsocr-mlx: DeepSeek-OCR on Apple Silicon through MLX.

    import dsocr_mlx
    model = dsocr_mlx.load("deepseek-ai/DeepSeek-OCR")
    print(model.ocr("page.png").text)

Importing this package imports neither mlx nor torch; the backend loads with the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["load", "OCRModel", "OCROptions", "OCRResult", "OptionError", "ProcessedInputs", "__version__"]

from .options import OCROptions, OptionError  # no heavy imports

if TYPE_CHECKING:
    from .pipeline import OCRModel, OCRResult
    from .processing import ProcessedInputs


def load(
    path_or_repo_id: str = "deepseek-ai/DeepSeek-OCR",
    backend: str = "mlx",
    dtype: str | None = None,
    device: str | None = None,
    options: OCROptions | None = None,
) -> OCRModel:
    """Load DeepSeek-OCR from a local folder or a Hugging Face repo id.

    Args:
        path_or_repo_id: a model folder (original Hugging Face layout) or a repo id such as
            ``deepseek-ai/DeepSeek-OCR`` (downloaded once into the huggingface_hub cache).
        backend: ``"mlx"``, ``"torch"`` or ``"auto"`` (MLX on Apple Silicon, PyTorch on CUDA hosts).
        dtype: ``"float16"``, ``"bfloat16"``, ``"float32"`` or None/``"auto"``: the dtype a converted folder
            was written in, else float16 on Apple's GPU, bfloat16 on CUDA and float32 on a CPU.
            Quantized folders load with no flags.
        device: the PyTorch backend's device, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (default: CUDA when
            available); naming one makes ``auto`` pick PyTorch. MLX chooses its own device.
        options: if given, checked against the model family as soon as its config.json is read, before
            the weights load (:class:`OptionError`, e.g. a DeepSeek-OCR mode asked of DeepSeek-OCR-2).

    Returns:
        An :class:`OCRModel` ready for ``prepare``, ``ocr`` and friends.
    """
    from .pipeline import OCRModel

    return OCRModel.load(path_or_repo_id, backend=backend, dtype=dtype, device=device, options=options)


def __getattr__(name: str):
    if name in ("OCRModel", "OCRResult"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "ProcessedInputs":
        from .processing import ProcessedInputs

        return ProcessedInputs
    raise AttributeError(f"module 'dsocr_mlx' has no attribute {name!r}")
