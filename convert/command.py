"""The converter's one command line: ``dsocr convert`` and ``python -m dsocr_convert`` run this function."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Opt = typer.Option


def convert(
    src: Annotated[str, typer.Argument(help="Hugging Face repo id or folder (original layout).")],
    dst: Annotated[Path, typer.Argument(help="Output folder.")],
    dtype: Annotated[str, Opt(help="float16, bfloat16 or float32.")] = "float16",
    q_bits: Annotated[int | None, Opt(help="Quantize with this many bits (2, 3, 4, 5, 6 or 8).")] = None,
    q_group_size: Annotated[int, Opt(help="Quantization group size (16, 32, 64 or 128).")] = 64,
    q_mode: Annotated[str, Opt(help="affine, mxfp4, mxfp8 or nvfp4.")] = "affine",
    q_vision: Annotated[bool, Opt(help="Also quantize the vision towers' linear layers.")] = False,
    q_embeddings: Annotated[bool, Opt(help="Also quantize the token embeddings.")] = False,
    overwrite: Annotated[bool, Opt(help="Replace DST.")] = False,
    upload_repo: Annotated[str | None, Opt(help="Upload the result to this Hugging Face repo.")] = None,
) -> None:
    """Convert the weights into an MLX folder (float16 by default, optionally quantized)."""
    from dsocr_mlx.convert import convert as run

    policy = {"vision": q_vision, "embed_tokens": q_embeddings}
    try:
        report = run(
            src,
            dst,
            dtype=dtype,
            q_bits=q_bits,
            q_group_size=q_group_size,
            q_mode=q_mode,
            q_policy=policy,
            overwrite=overwrite,
            upload_repo=upload_repo,
        )
    except (OSError, ValueError, ConnectionError, ImportError) as e:
        typer.echo(f"dsocr convert: {e}", err=True)
        raise typer.Exit(1) from None
    quantized = f", {report.quantization['bits']}-bit quantized" if report.quantization else ""
    typer.echo(
        f"wrote {report.path} ({report.bytes / 1e9:.2f} GB, {len(report.files)} shard(s), {report.dtype}{quantized})"
    )
