"""The converter's one command line: ``dsocr convert`` and ``python -m dsocr_convert`` run this function.

Besides its own spelling (``SRC DST``), it takes the one of ``mlx_lm.convert``: ``--hf-path``,
``--mlx-path``, ``-q/--quantize`` (with the default bits) and ``-d/--dequantize``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Opt = typer.Option
DEFAULT_Q_BITS = 4  # mlx_lm.convert's -q default, and QuantPolicy's


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"dsocr convert: {message}", err=True)
    return typer.Exit(code)


def _one(positional: str | Path | None, option: str | Path | None, what: str, metavar: str, flag: str) -> str | Path:
    if positional is not None and option is not None and str(positional) != str(option):
        raise _fail(f"the {what} is given twice ({positional} and {flag} {option}): give one", 2)
    value = positional if positional is not None else option
    if value is None:
        raise _fail(f"give the {what}: {metavar} or {flag}", 2)
    return value


def convert(
    src: Annotated[
        str | None, typer.Argument(help="Hugging Face repo id or folder (original layout).", show_default=False)
    ] = None,
    dst: Annotated[Path | None, typer.Argument(help="Output folder.", show_default=False)] = None,
    hf_path: Annotated[str | None, Opt("--hf-path", help="The source, as mlx_lm.convert spells it.")] = None,
    mlx_path: Annotated[Path | None, Opt("--mlx-path", help="The output folder, as mlx_lm.convert spells it.")] = None,
    dtype: Annotated[str, Opt(help="float16, bfloat16 or float32.")] = "float16",
    quantize: Annotated[
        bool, Opt("-q", "--quantize", help=f"Quantize, with --q-bits (default {DEFAULT_Q_BITS}).")
    ] = False,
    dequantize: Annotated[
        bool,
        Opt("-d", "--dequantize", help="Write a quantized `dsocr convert` folder back in floating point (--dtype)."),
    ] = False,
    q_bits: Annotated[int | None, Opt(help="Quantize with this many bits (2, 3, 4, 5, 6 or 8).")] = None,
    q_group_size: Annotated[int, Opt(help="Quantization group size (16, 32, 64 or 128).")] = 64,
    q_mode: Annotated[str, Opt(help="affine, mxfp4, mxfp8 or nvfp4.")] = "affine",
    q_recipe: Annotated[
        str | None,
        Opt(
            "--q-recipe",
            "--quant-predicate",
            help="Mixed-precision recipe instead of --q-bits: mixed_2_6, mixed_3_4, mixed_3_5, mixed_3_6, mixed_3_8, "
            "mixed_4_6 or mixed_4_8 (mixed_LOW_HIGH: routed experts at LOW bits; attention, shared experts, "
            "dense MLP and lm_head at HIGH bits).",
        ),
    ] = None,
    q_vision: Annotated[bool, Opt(help="Also quantize the vision towers' linear layers.")] = False,
    q_embeddings: Annotated[bool, Opt(help="Also quantize the token embeddings.")] = False,
    overwrite: Annotated[bool, Opt(help="Replace DST if it is an earlier `dsocr convert` output.")] = False,
    upload_repo: Annotated[str | None, Opt(help="Upload the result to this Hugging Face repo.")] = None,
) -> None:
    """Convert the weights into an MLX folder (float16 by default, optionally quantized), or back to floats."""
    source = str(_one(src, hf_path, "source", "SRC", "--hf-path"))
    target = Path(_one(dst, mlx_path, "destination", "DST", "--mlx-path"))
    quantizing = quantize or q_bits is not None or q_recipe is not None
    if dequantize and (quantizing or q_vision or q_embeddings):
        raise _fail("--dequantize writes floats: drop -q/--quantize and the --q-* options", 2)
    try:
        if dequantize:
            from dsocr_mlx.convert import dequantize as run_dequantize

            report = run_dequantize(source, target, dtype=dtype, overwrite=overwrite)
            if upload_repo:
                from dsocr_mlx.convert import upload

                upload(report.path, upload_repo)
        else:
            from dsocr_mlx.convert import convert as run

            report = run(
                source,
                target,
                dtype=dtype,
                q_bits=DEFAULT_Q_BITS if quantize and q_bits is None and q_recipe is None else q_bits,
                q_group_size=q_group_size,
                q_mode=q_mode,
                q_recipe=q_recipe,
                q_policy={"vision": q_vision, "embed_tokens": q_embeddings},
                overwrite=overwrite,
                upload_repo=upload_repo,
            )
    except (OSError, ValueError, ConnectionError, ImportError) as e:
        # The library's keyword is the command line's flag.
        raise _fail(str(e).replace("pass overwrite to", "pass --overwrite to"), 1) from None
    q = report.quantization
    quantized = f", {q.get('recipe') or str(q['bits']) + '-bit'} quantized" if q else ""
    typer.echo(
        f"wrote {report.path} ({report.bytes / 1e9:.2f} GB, {len(report.files)} shard(s), {report.dtype}{quantized})"
    )
