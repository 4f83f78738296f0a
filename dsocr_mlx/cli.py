"""The ``dsocr`` command line: a thin Typer shell over the library (heavy imports inside commands)."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from dsocr_convert.command import convert as convert_command

from . import __version__
from .options import OCROptions, OptionError, option_fields, option_kind

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="DeepSeek-OCR on Apple Silicon through MLX: images and PDFs to Markdown.",
)
Opt = typer.Option


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dsocr-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, Opt("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    """DeepSeek-OCR on Apple Silicon through MLX."""


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"dsocr: {message}", err=True)
    return typer.Exit(code)


def _flag(f: dataclasses.Field) -> Any:
    """The Typer annotation of one option's flag (every flag defaults to None: "not given")."""
    name, kind, help = f.name.replace("_", "-"), option_kind(f.name), f.metadata["help"]
    default = f.default
    if default not in (None, ()):
        help += f"; built-in default {str(default).lower() if kind is bool else default}"
    if kind is bool:
        return Annotated[bool | None, Opt(f"--{name}/--no-{name}", help=help + ".")]
    if kind is tuple:
        return Annotated[list[str] | None, Opt(f"--{name}", help=help + " (repeatable).")]
    return Annotated[kind | None, Opt(f"--{name}", help=help + ".")]


def with_option_flags(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` (which takes ``**options``) one flag per field of :class:`OCROptions` meant for the CLI."""
    own = inspect.signature(command, eval_str=True)
    params = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=_flag(f))
        for f in option_fields("cli")
    ]
    command.__signature__ = own.replace(parameters=params)
    return command


def _options(base: OCROptions, given: dict[str, Any]) -> OCROptions:
    try:
        return base.merged(**given)
    except OptionError as e:
        raise _fail(f"--{e.option.replace('_', '-')}: {e}", 2) from None


@app.command()
@with_option_flags
def ocr(
    inputs: Annotated[list[str], typer.Argument(help="Images, PDFs, folders or globs.", show_default=False)],
    model: Annotated[str | None, Opt(help="Model folder or Hugging Face repo id.")] = None,
    backend: Annotated[str | None, Opt(help="mlx, torch or auto.")] = None,
    dtype: Annotated[str | None, Opt(help="auto, float16, bfloat16 or float32.")] = None,
    device: Annotated[str | None, Opt(help="auto, cpu, cuda or cuda:N (PyTorch backend).")] = None,
    pages: Annotated[str | None, Opt(help="PDF pages, e.g. 1-3,7.")] = None,
    out: Annotated[Path | None, Opt(help="Write the official artefacts per input here.")] = None,
    fmt: Annotated[str, Opt("--format", help="markdown, json or text on standard output.")] = "markdown",
    stream: Annotated[bool | None, Opt("--stream/--no-stream", help="Print text as it comes.")] = None,
    overwrite: Annotated[bool, Opt(help="Replace existing results.")] = False,
    config: Annotated[Path | None, Opt(help="config.toml to use.")] = None,
    verbose: Annotated[bool, Opt(help="Log details and show tracebacks.")] = False,
    **given: Any,
) -> None:
    """Read images and PDFs and print (or write) their text as Markdown.

    The OCR options (task, mode, sampling, ...) default to the ocr section of config.toml, then to the
    built-in defaults.
    """
    from . import settings as cfg

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    if fmt not in ("markdown", "json", "text"):
        raise _fail(f"--format must be markdown, json or text, not {fmt!r}", 2)
    try:
        conf = cfg.load_settings(config)
    except ValueError as e:
        raise _fail(str(e), 2) from None
    options = _options(conf.ocr, given)
    m = cfg.merge(conf.model, path=model, backend=backend, dtype=dtype, device=device)
    from . import batch

    items = batch.expand_inputs(inputs)
    single = len(items) == 1 and not items[0].is_pdf
    if len(items) > 1 and out is None:
        raise _fail("several inputs need --out DIR for their results", 2)
    stream = (single and fmt != "json" and sys.stdout.isatty()) if stream is None else stream
    try:
        import dsocr_mlx

        # The options are checked against the model family (its config.json) before the weights load.
        loaded = dsocr_mlx.load(m["path"], backend=m["backend"], dtype=m["dtype"], device=m["device"], options=options)
    except OptionError as e:
        raise _fail(f"--{e.option.replace('_', '-')}: {e}", 2) from None
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

            on_text = (lambda text: (sys.stdout.write(text), sys.stdout.flush())) if stream else None
            for outcome in batch.run_items(loaded, items, options, out, overwrite, pages, on_page, on_text):
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
        typer.echo(
            f"dsocr: {done} of {len(items)} input(s) done" + (f", failed: {', '.join(failures)}" if failures else ""),
            err=True,
        )
    if failures:
        raise typer.Exit(1)


app.command("convert")(convert_command)


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
    remote_images: Annotated[
        bool | None,
        Opt("--allow-remote-images/--no-remote-images", help="Fetch http(s) image URLs (public addresses only)."),
    ] = None,
    cors_origin: Annotated[list[str] | None, Opt(help="Allow browser calls from this origin (repeatable).")] = None,
    model_switch: Annotated[
        bool | None, Opt("--allow-model-switch/--no-model-switch", help="Let a request load another configured model.")
    ] = None,
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
    conf.model = cfg.merge(conf.model, path=model, backend=backend, dtype=dtype, device=device)
    conf.server = cfg.merge(
        conf.server,
        host=host,
        port=port,
        api_key=api_key,
        max_queue=max_queue,
        request_timeout=request_timeout,
        allow_remote_images=remote_images,
        cors_origins=cors_origin or None,
        allow_model_switch=model_switch,
    )
    s = conf.server
    if s["host"] not in ("127.0.0.1", "localhost", "::1") and not s["api_key"]:
        logging.getLogger("dsocr_server").warning(
            "binding %s without an API key: anyone who can reach it can use it", s["host"]
        )
    try:
        import uvicorn
        from dsocr_server import create_app
    except ImportError as e:
        raise _fail(f"the server needs its extra ({e}): pip install 'dsocr-mlx[server]'") from None
    try:
        asgi = create_app(conf)
    except ValueError as e:
        raise _fail(str(e), 2) from None
    # Running requests get shutdown_timeout seconds on Ctrl-C or SIGTERM; then they are cancelled.
    uvicorn.run(
        asgi,
        host=s["host"],
        port=s["port"],
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=s["shutdown_timeout"],
    )


@app.command()
def bench(
    model: Annotated[str | None, Opt(help="Model folder or repo id (default: a full-size random checkpoint).")] = None,
    backend: Annotated[str, Opt(help="mlx, torch or auto (see PyTorch backend in README).")] = "auto",
    dtype: Annotated[str, Opt(help="auto, float16, bfloat16 or float32 (auto: float32 on a CPU).")] = "auto",
    device: Annotated[str, Opt(help="auto, cpu, cuda or cuda:N (PyTorch backend).")] = "auto",
    mode: Annotated[
        str | None,
        Opt(
            help="A mode of the model (default: its official one). DeepSeek-OCR: tiny, small, base, "
            "large, gundam; DeepSeek-OCR-2: default."
        ),
    ] = None,
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
        result = run_benchmark(
            model, backend=backend, dtype=dtype, mode=mode, tokens=tokens, trials=trials, device=device
        )
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise _fail(str(e)) from None
    typer.echo(describe(result))
    typer.echo(markdown_table([result]))
    if out is not None:
        for path in save_outputs([result], out):
            typer.echo(f"wrote {path}")
    if pdf_pages > 0:
        pdf = run_pdf_benchmark(
            model, backend=backend, dtype=dtype, mode=mode, pages=pdf_pages, tokens=tokens, device=device
        )
        typer.echo(
            f"PDF, {pdf_pages} pages, up to {tokens} tokens each: {pdf['pages_per_minute']:.2f} pages/minute "
            f"({pdf['seconds']:.1f} s, {pdf['generated_tokens']} tokens, peak {pdf['peak_memory_gb']:.2f} GB)"
        )
        if out is not None:
            import json

            (out / "bench_pdf.json").write_text(json.dumps(pdf, indent=1))
            typer.echo(f"wrote {out / 'bench_pdf.json'}")


@app.command("make-test-model")
def make_test_model(
    dst: Annotated[Path, typer.Argument(help="Folder to write.")],
    size: Annotated[str, Opt(help="tiny (a few MB) or full (the real shapes: 6.7 GB).")] = "tiny",
    family: Annotated[str, Opt(help="deepseek-ocr or deepseek-ocr-2.")] = "deepseek-ocr",
    layers: Annotated[int, Opt(help="Decoder layers (default: 2 tiny, 12 full).")] = 0,
    seed: Annotated[int, Opt(help="Random seed.")] = 0,
    overwrite: Annotated[bool, Opt(help="Replace DST if it exists.")] = False,
) -> None:
    """Write a random checkpoint with the real tensor names and shapes, for tests and benchmarks."""
    from .random_checkpoint import preset_args, write_random_checkpoint

    try:
        args = preset_args(size, family, layers or None)
    except ValueError as e:
        raise _fail(str(e), 2) from None
    try:
        write_random_checkpoint(dst, args, seed=seed, overwrite=overwrite)
    except (FileExistsError, ImportError, ValueError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"wrote {dst} ({args.family_name})")


if __name__ == "__main__":
    sys.exit(app())
