"""The ``dsocr`` command line: a thin Typer shell over the library (heavy imports inside commands)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="DeepSeek-OCR on Apple Silicon through MLX: images and PDFs to Markdown.")
Opt = typer.Option


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dsocr-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, Opt("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
         ) -> None:
    """DeepSeek-OCR on Apple Silicon through MLX."""


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"dsocr: {message}", err=True)
    return typer.Exit(code)


@app.command()
def ocr(
    inputs: Annotated[list[str], typer.Argument(help="Images, PDFs, folders or globs.", show_default=False)],
    model: Annotated[str | None, Opt(help="Model folder or Hugging Face repo id.")] = None,
    backend: Annotated[str | None, Opt(help="mlx, torch or auto.")] = None,
    dtype: Annotated[str | None, Opt(help="auto, float16, bfloat16 or float32.")] = None,
    device: Annotated[str | None, Opt(help="auto, cpu, cuda or cuda:N (PyTorch backend).")] = None,
    mode: Annotated[str | None, Opt(help="tiny, small, base, large or gundam.")] = None,
    task: Annotated[str | None, Opt(help="markdown, ocr, free, figure, describe or locate.")] = None,
    prompt: Annotated[str | None, Opt(help="Custom prompt (one <image> per image).")] = None,
    ref: Annotated[str | None, Opt(help="Text to find, for --task locate.")] = None,
    pages: Annotated[str | None, Opt(help="PDF pages, e.g. 1-3,7.")] = None,
    dpi: Annotated[int | None, Opt(help="PDF rendering resolution.")] = None,
    max_new_tokens: Annotated[int | None, Opt(help="Most tokens per page.")] = None,
    temperature: Annotated[float | None, Opt(help="0 = greedy.")] = None,
    top_p: Annotated[float | None, Opt(help="Nucleus sampling mass.")] = None,
    top_k: Annotated[int | None, Opt(help="Sample among the k best (0 = off).")] = None,
    seed: Annotated[int | None, Opt(help="Random seed for sampling.")] = None,
    repetition_penalty: Annotated[float | None, Opt(help="1 = off.")] = None,
    no_repeat_ngram_size: Annotated[int | None, Opt(help="n-gram ban size (0 = off).")] = None,
    ngram_window: Annotated[int | None, Opt(help="n-gram ban window.")] = None,
    out: Annotated[Path | None, Opt(help="Write the official artefacts per input here.")] = None,
    fmt: Annotated[str, Opt("--format", help="markdown, json or text on standard output.")] = "markdown",
    stream: Annotated[bool | None, Opt("--stream/--no-stream", help="Print tokens as they come.")] = None,
    overwrite: Annotated[bool, Opt(help="Replace existing results.")] = False,
    config: Annotated[Path | None, Opt(help="config.toml to use.")] = None,
    verbose: Annotated[bool, Opt(help="Log details and show tracebacks.")] = False,
) -> None:
    """Read images and PDFs and print (or write) their text as Markdown."""
    from . import settings as cfg

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    if fmt not in ("markdown", "json", "text"):
        raise _fail(f"--format must be markdown, json or text, not {fmt!r}", 2)
    try:
        conf = cfg.load_settings(config)
    except ValueError as e:
        raise _fail(str(e), 2) from None
    m = cfg.merge(conf["model"], path=model, backend=backend, dtype=dtype, device=device)
    o = cfg.merge(conf["ocr"], mode=mode, task=None if prompt else task, max_new_tokens=max_new_tokens, dpi=dpi,
                  temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty)
    if prompt:
        o["task"] = None
    from . import batch

    items = batch.expand_inputs(inputs)
    single = len(items) == 1 and not items[0].is_pdf
    if len(items) > 1 and out is None:
        raise _fail("several inputs need --out DIR for their results", 2)
    stream = (single and fmt != "json" and sys.stdout.isatty()) if stream is None else stream
    kwargs = dict(prompt=prompt, task=o["task"], ref=ref, mode=o["mode"], max_new_tokens=o["max_new_tokens"],
                  temperature=o["temperature"], top_p=o["top_p"], top_k=o["top_k"], seed=seed,
                  repetition_penalty=o["repetition_penalty"], no_repeat_ngram_size=no_repeat_ngram_size,
                  ngram_window=ngram_window, detect_loops=o["detect_loops"],
                  retry_on_repetition=o["retry_on_repetition"])
    try:
        import dsocr_mlx

        loaded = dsocr_mlx.load(m["path"], backend=m["backend"], dtype=m["dtype"], device=m["device"])
    except (FileNotFoundError, ValueError, ImportError, OSError) as e:
        if verbose:
            raise
        raise _fail(f"cannot load the model {m['path']}: {e}") from None
    from .progress import Progress

    failures, done = [], 0
    try:
        with Progress(None, "pages", enabled=False if single else None) as bar:
            def on_page(item, result):
                bar.update(1, f"{Path(item.name).name} {result.timings.get('generation_tps', 0):.1f} tok/s")

            on_delta = (lambda text: (sys.stdout.write(text), sys.stdout.flush())) if stream else None
            for outcome in batch.run_items(loaded, items, out, overwrite, pages, o["dpi"], kwargs, on_page,
                                           on_delta):
                if outcome.error:
                    failures.append(outcome.item.name)
                    if verbose and outcome.exception is not None:
                        import traceback

                        typer.echo("".join(traceback.format_exception(outcome.exception)).rstrip(), err=True)
                    typer.echo(f"dsocr: {outcome.item.name}: {outcome.error}", err=True)
                    continue
                done += 1
                if out is None:
                    typer.echo("" if stream else batch.render(outcome, fmt))
    except KeyboardInterrupt:
        typer.echo(f"dsocr: interrupted; {done} input(s) finished and kept", err=True)
        raise typer.Exit(130) from None
    if len(items) > 1 or failures:
        typer.echo(f"dsocr: {done} of {len(items)} input(s) done" + (f", failed: {', '.join(failures)}"
                                                                       if failures else ""), err=True)
    if failures:
        raise typer.Exit(1)


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="Hugging Face repo id or folder (original layout).")],
    dst: Annotated[Path, typer.Argument(help="Output folder.")],
    dtype: Annotated[str, Opt(help="float16, bfloat16 or float32.")] = "float16",
    q_bits: Annotated[int | None, Opt(help="Quantize with this many bits (4, 8, ...).")] = None,
    q_group_size: Annotated[int, Opt(help="Quantization group size.")] = 64,
    q_mode: Annotated[str, Opt(help="affine, mxfp4, mxfp8 or nvfp4.")] = "affine",
    q_vision: Annotated[bool, Opt(help="Also quantize the vision towers' linear layers.")] = False,
    q_embeddings: Annotated[bool, Opt(help="Also quantize the token embeddings.")] = False,
    overwrite: Annotated[bool, Opt(help="Replace DST.")] = False,
    upload_repo: Annotated[str | None, Opt(help="Upload the result to this Hugging Face repo.")] = None,
) -> None:
    """Convert the weights into an MLX folder (float16 by default, optionally quantized)."""
    from .convert import convert as run

    policy = {"vision": q_vision, "embed_tokens": q_embeddings}
    try:
        report = run(src, dst, dtype=dtype, q_bits=q_bits, q_group_size=q_group_size, q_mode=q_mode,
                     q_policy=policy, overwrite=overwrite, upload_repo=upload_repo)
    except (FileNotFoundError, FileExistsError, ValueError, ConnectionError, ImportError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"wrote {report.path} ({report.bytes / 1e9:.2f} GB, {len(report.files)} shard(s))")


@app.command()
def models() -> None:
    """List the DeepSeek-OCR models in the local Hugging Face cache and their formats."""
    from .hub import list_cached_models

    found = list_cached_models()
    if not found:
        typer.echo("no DeepSeek-OCR model in the Hugging Face cache (HF_HOME); `dsocr ocr` downloads one")
    for repo, kind, path, size in found:
        typer.echo(f"{repo}\t{kind}\t{size / 1e9:.2f} GB\t{path}")


@app.command()
def serve(
    model: Annotated[str | None, Opt(help="Model folder or Hugging Face repo id.")] = None,
    backend: Annotated[str | None, Opt(help="mlx, torch or auto.")] = None,
    dtype: Annotated[str | None, Opt(help="auto, float16, bfloat16 or float32.")] = None,
    device: Annotated[str | None, Opt(help="auto, cpu, cuda or cuda:N (PyTorch backend).")] = None,
    host: Annotated[str | None, Opt(help="Address to bind (default 127.0.0.1: this machine only).")] = None,
    port: Annotated[int | None, Opt(help="Port (default 8000).")] = None,
    api_key: Annotated[str | None, Opt(envvar="DSOCR_API_KEY", help="Require Authorization: Bearer KEY.")] = None,
    max_queue: Annotated[int | None, Opt(help="Requests waiting behind the running one (then 429).")] = None,
    request_timeout: Annotated[float | None, Opt(help="Seconds a request may take in all.")] = None,
    remote_images: Annotated[bool | None, Opt("--allow-remote-images/--no-remote-images",
                                              help="Fetch http(s) image URLs (public addresses only).")] = None,
    cors_origin: Annotated[list[str] | None, Opt(help="Allow browser calls from this origin (repeatable).")] = None,
    model_switch: Annotated[bool | None, Opt("--allow-model-switch/--no-model-switch",
                                             help="Let a request load another configured model.")] = None,
    config: Annotated[Path | None, Opt(help="config.toml to use.")] = None,
    verbose: Annotated[bool, Opt(help="Log details.")] = False,
) -> None:
    """Serve an OpenAI-compatible API (chat completions, responses, OCR upload) on this machine."""
    from . import settings as cfg

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        conf = cfg.load_settings(config)
    except ValueError as e:
        raise _fail(str(e), 2) from None
    conf["model"] = cfg.merge(conf["model"], path=model, backend=backend, dtype=dtype, device=device)
    conf["server"] = cfg.merge(conf["server"], host=host, port=port, api_key=api_key, max_queue=max_queue,
                               request_timeout=request_timeout, allow_remote_images=remote_images,
                               cors_origins=cors_origin or None, allow_model_switch=model_switch)
    s = conf["server"]
    if s["host"] not in ("127.0.0.1", "localhost", "::1") and not s["api_key"]:
        logging.getLogger("dsocr_server").warning("binding %s without an API key: anyone who can reach it can use it",
                                                  s["host"])
    try:
        import uvicorn
        from dsocr_server import create_app
    except ImportError as e:
        raise _fail(f"the server needs its extra ({e}): pip install 'dsocr-mlx[server]'") from None
    uvicorn.run(create_app(conf), host=s["host"], port=s["port"], access_log=False, log_level="info")


@app.command()
def bench(
    model: Annotated[str | None, Opt(help="Model folder or repo id (default: a full-size random checkpoint).")] = None,
    backend: Annotated[str, Opt(help="mlx, torch or auto (see PyTorch backend in README).")] = "auto",
    dtype: Annotated[str, Opt(help="auto, float16, bfloat16 or float32 (auto: float32 on a CPU).")] = "auto",
    device: Annotated[str, Opt(help="auto, cpu, cuda or cuda:N (PyTorch backend).")] = "auto",
    mode: Annotated[str, Opt(help="tiny, small, base, large or gundam (tiled, several times slower).")] = "base",
    tokens: Annotated[int, Opt(help="Tokens generated per trial (EOS ignored).")] = 32,
    trials: Annotated[int, Opt(help="Timed trials after one warm-up.")] = 2,
    out: Annotated[Path | None, Opt(help="Write bench.json, bench.md and bench.png here.")] = None,
    pdf_pages: Annotated[int, Opt(help="Also OCR a PDF of this many pages end to end and report pages/minute.")] = 0,
) -> None:
    """Time every stage of the pipeline: load, preprocessing, vision, prefill, first token, decode, memory."""
    from .bench import describe, markdown_table, run_benchmark, run_pdf_benchmark, save_outputs

    if model is None:
        from .random_checkpoint import default_bench_checkpoint

        model = str(default_bench_checkpoint())
    try:
        result = run_benchmark(model, backend=backend, dtype=dtype, mode=mode, tokens=tokens, trials=trials,
                               device=device)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise _fail(str(e)) from None
    typer.echo(describe(result))
    typer.echo(markdown_table([result]))
    if out is not None:
        for path in save_outputs([result], out):
            typer.echo(f"wrote {path}")
    if pdf_pages > 0:
        pdf = run_pdf_benchmark(model, backend=backend, dtype=dtype, mode=mode, pages=pdf_pages, tokens=tokens,
                                device=device)
        typer.echo(f"PDF, {pdf_pages} pages, up to {tokens} tokens each: {pdf['pages_per_minute']:.2f} pages/minute "
                   f"({pdf['seconds']:.1f} s, {pdf['generated_tokens']} tokens, peak {pdf['peak_memory_gb']:.2f} GB)")
        if out is not None:
            import json

            (out / "bench_pdf.json").write_text(json.dumps(pdf, indent=1))
            typer.echo(f"wrote {out / 'bench_pdf.json'}")


@app.command("make-test-model")
def make_test_model(
    dst: Annotated[Path, typer.Argument(help="Folder to write.")],
    size: Annotated[str, Opt(help="tiny (a few MB) or full (the real 3.3B shapes, 6.7 GB).")] = "tiny",
    layers: Annotated[int, Opt(help="Decoder layers (default: 2 tiny, 12 full).")] = 0,
    seed: Annotated[int, Opt(help="Random seed.")] = 0,
    overwrite: Annotated[bool, Opt(help="Replace DST if it exists.")] = False,
) -> None:
    """Write a random checkpoint with the real tensor names and shapes, for tests and benchmarks."""
    from .random_checkpoint import PRESETS, write_random_checkpoint

    if size not in PRESETS:
        raise _fail(f"unknown size {size!r}: choose {' or '.join(PRESETS)}", 2)
    args = PRESETS[size](layers) if layers else PRESETS[size]()
    try:
        write_random_checkpoint(dst, args, seed=seed, overwrite=overwrite)
    except (FileExistsError, ImportError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"wrote {dst}")


if __name__ == "__main__":
    sys.exit(app())
