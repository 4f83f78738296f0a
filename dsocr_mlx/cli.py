"""The ``dsocr`` command line: a thin Typer shell over the library (heavy imports inside commands)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, help="DeepSeek-OCR on Apple Silicon through MLX.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dsocr-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="Show the version and exit.")] = False) -> None:
    """DeepSeek-OCR on Apple Silicon through MLX."""


@app.command()
def ocr(
    image: Annotated[Path, typer.Argument(help="Image file to read.")],
    model: Annotated[str, typer.Option(help="Model folder or Hugging Face repo id.")] = "deepseek-ai/DeepSeek-OCR",
    prompt: Annotated[str, typer.Option(help="Prompt with one <image> placeholder.")] = (
        "<image>\n<|grounding|>Convert the document to markdown."),
    mode: Annotated[str, typer.Option(help="tiny, small, base, large or gundam.")] = "gundam",
    dtype: Annotated[str, typer.Option(help="float16, bfloat16 or float32.")] = "float16",
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 8192,
    raw: Annotated[bool, typer.Option(help="Print the raw output with grounding spans.")] = False,
    verbose: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Read IMAGE and print its text as Markdown."""
    import dsocr_mlx

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    try:
        loaded = dsocr_mlx.load(model, dtype=dtype)
        result = loaded.ocr(image, prompt=prompt, mode=mode, max_new_tokens=max_new_tokens)
    except (FileNotFoundError, ValueError, ImportError, MemoryError) as e:
        if verbose:
            raise
        typer.echo(f"dsocr: {image}: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(result.raw_text if raw else result.text)


@app.command("make-test-model")
def make_test_model(
    dst: Annotated[Path, typer.Argument(help="Folder to write.")],
    size: Annotated[str, typer.Option(help="tiny (a few MB) or full (the real 3.3B shapes, 6.7 GB).")] = "tiny",
    layers: Annotated[int, typer.Option(help="Decoder layers (default: 2 tiny, 12 full).")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace DST if it exists.")] = False,
) -> None:
    """Write a random checkpoint with the real tensor names and shapes, for tests and benchmarks."""
    from .random_checkpoint import PRESETS, write_random_checkpoint

    if size not in PRESETS:
        typer.echo(f"dsocr: unknown size {size!r}: choose {' or '.join(PRESETS)}", err=True)
        raise typer.Exit(2)
    args = PRESETS[size](layers) if layers else PRESETS[size]()
    try:
        write_random_checkpoint(dst, args, seed=seed, overwrite=overwrite)
    except (FileExistsError, ImportError) as e:
        typer.echo(f"dsocr: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {dst}")


if __name__ == "__main__":
    sys.exit(app())
