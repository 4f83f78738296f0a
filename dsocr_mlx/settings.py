"""One ``config.toml`` shared by the CLI and the server: defaults, the file, and their precedence.

Precedence: command line or request > config file > built-in defaults. A missing file is created with
the defaults (commented) on first use, so users can see every setting. The ``[ocr]`` section is the
:class:`~dsocr_mlx.options.OCROptions` (its defaults and its documentation come from there).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .options import OCROptions, OptionError, coerce, option_fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"path": "deepseek-ai/DeepSeek-OCR", "backend": "auto", "dtype": "auto", "device": "auto"},
    "server": {
        "host": "127.0.0.1",
        "port": 8000,
        "api_key": "",
        "max_queue": 16,
        "max_batch": 4,
        "request_timeout": 600,
        "max_body_mb": 50,
        "max_image_pixels": 100_000_000,
        "max_pdf_pages": 50,
        "max_images": 1,
        "max_tokens_cap": 8192,
        "allow_remote_images": False,
        "cors_origins": [],
        "models": {},
        "allow_model_switch": True,
        "allowed_hosts": [],
        "shutdown_timeout": 10,
        "keep_alive": "5m",
        "aliases": [],
        "accept_any_model": False,
        "web_ui": True,
        "history_dir": "",  # "": default_history_dir()
        "history_max_entries": 500,
        "history_max_mb": 2048,
    },
}

_TEMPLATE = """# dsocr configuration (created with the defaults; edit and uncomment what you want to change).
# Command-line options and server request fields override these values.

[model]
# path = "deepseek-ai/DeepSeek-OCR"   # Hugging Face repo id or local folder
# backend = "auto"                    # auto, mlx or torch
# dtype = "auto"                      # auto, float16, bfloat16 or float32 (auto: float16 on Apple's GPU,
#                                     # bfloat16 on CUDA, float32 on a CPU)
# device = "auto"                     # auto, cpu, cuda or cuda:N (the PyTorch backend's device)

{ocr}
[server]
# host = "127.0.0.1"
# port = 8000
# api_key = ""                        # require "Authorization: Bearer KEY" when set
# max_queue = 16                      # requests waiting behind the running ones (then 429)
# max_batch = 4                       # requests decoded together, sharing each step (1: one at a time)
# request_timeout = 600               # seconds
# max_body_mb = 50
# max_image_pixels = 100000000
# max_pdf_pages = 50
# max_images = 1                      # images per request
# max_tokens_cap = 8192
# allow_remote_images = false
# cors_origins = []
# allow_model_switch = true
# allowed_hosts = []                  # host names answered besides IP addresses and localhost ("*": any),
#                                     # e.g. the name a reverse proxy passes on; others get 403 (DNS rebinding)
# shutdown_timeout = 10               # seconds running requests get to finish on Ctrl-C or SIGTERM
# keep_alive = "5m"                   # unload the model after this long idle (Ollama's semantics: "30s",
#                                     # "10m", "1h", seconds as a number, 0 = at once, -1 = never)
# aliases = []                        # more names for the configured model (besides its folder name, its
#                                     # repo id and deepseek-ocr / deepseek-ocr-2)
# accept_any_model = false            # with one model configured, answer whatever model name a client sends
# web_ui = true                       # the OCR page at / and its REST API (/api/ocr, /api/history, ...)
# history_dir = ""                    # where the page keeps its results ("": ~/Library/Application Support/
#                                     # dsocr/history on macOS, $XDG_DATA_HOME/dsocr/history or
#                                     # ~/.local/share/dsocr/history elsewhere)
# history_max_entries = 500           # the oldest results are removed beyond this many (0: no limit)
# history_max_mb = 2048               # ... or beyond this many megabytes on disk (0: no limit)

# [server.models]                     # extra models a request may name: name = "repo id or folder"
# small = "mlx-community/DeepSeek-OCR-4bit"
"""


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def _ocr_section() -> str:
    lines = ["[ocr]"]
    defaults = OCROptions()
    for f in option_fields("config"):
        value = getattr(defaults, f.name)
        shown = f"{f.name} = {_toml(f.metadata['example'] if value is None else value)}"
        lines.append(f"# {shown:<34}  # {f.metadata['help']}")
    return "\n".join(lines) + "\n\n"


TEMPLATE = _TEMPLATE.replace("{ocr}\n", _ocr_section())


@dataclass
class Settings:
    """What the CLI and the server run with: ``model`` and ``server`` sections, and the OCR options."""

    model: dict[str, Any] = field(default_factory=lambda: dict(DEFAULTS["model"]))
    ocr: OCROptions = field(default_factory=OCROptions)
    server: dict[str, Any] = field(default_factory=lambda: dict(DEFAULTS["server"]))


def default_config_path() -> Path:
    """``$DSOCR_CONFIG``, else the platform's config folder (``~/Library/Application Support/dsocr`` on
    macOS, ``$XDG_CONFIG_HOME/dsocr`` or ``~/.config/dsocr`` elsewhere)."""
    if os.environ.get("DSOCR_CONFIG"):
        return Path(os.environ["DSOCR_CONFIG"]).expanduser()
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "dsocr" / "config.toml"


def default_history_dir() -> Path:
    """The web page's history folder: ``~/Library/Application Support/dsocr/history`` on macOS,
    ``$XDG_DATA_HOME/dsocr/history`` or ``~/.local/share/dsocr/history`` elsewhere."""
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "dsocr" / "history"


def load_settings(path: str | Path | None = None, create: bool = True) -> Settings:
    """The defaults overlaid with the config file (created with the defaults if missing).

    Raises:
        ValueError: the file is not valid TOML, or names an unknown section or setting, or a bad value
            (the message names the file and the setting).
    """
    path = Path(path).expanduser() if path else default_config_path()
    settings = Settings()
    if not path.exists():
        if create:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(TEMPLATE)
            except OSError:
                pass  # a read-only home must not stop OCR: the defaults apply
        return settings
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid TOML ({e}); fix it or delete it to get the defaults back") from None
    sections = ("model", "ocr", "server")
    for section, values in data.items():
        if section not in sections or not isinstance(values, dict):
            raise ValueError(f"{path}: unknown section [{section}] (known: {', '.join(sections)})")
        if section == "ocr":
            settings.ocr = _ocr_options(path, values)
            continue
        for key, value in values.items():
            if key not in DEFAULTS[section]:
                raise ValueError(f"{path}: unknown setting {section}.{key}")
            default = DEFAULTS[section][key]
            if key == "keep_alive":
                try:
                    parse_keep_alive(value)
                except ValueError as e:
                    raise ValueError(f"{path}: server.keep_alive: {e}") from None
            elif (
                isinstance(default, bool) != isinstance(value, bool)
                or (isinstance(default, (int, float)) and not isinstance(value, (int, float)))
                or (isinstance(default, str) and not isinstance(value, str))
                or (
                    isinstance(default, list)
                    and not (isinstance(value, list) and all(isinstance(v, str) for v in value))
                )
            ):
                raise ValueError(f"{path}: {section}.{key} should be like {default!r}, got {value!r}")
            getattr(settings, section)[key] = value
    return settings


def _ocr_options(path: Path, values: dict[str, Any]) -> OCROptions:
    known = {f.name for f in option_fields("config")}
    try:
        for key, value in values.items():
            if key not in known:
                raise OptionError(key, f"unknown setting ocr.{key} (known: {', '.join(sorted(known))})")
            coerce(key, value)
        return OCROptions().merged(**values)
    except OptionError as e:
        raise ValueError(f"{path}: [ocr] {e}") from None


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float:
    """Ollama's ``keep_alive`` in seconds: a number of seconds, or a duration such as ``"30s"``, ``"5m"``,
    ``"1h30m"``; 0 unloads right after the request; a negative value keeps the model forever (``inf``).

    Raises:
        ValueError: anything else (the message names the accepted forms).
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        sign, text = (-1.0, text[1:]) if text.startswith("-") else (1.0, text)
        if re.fullmatch(r"\d+(\.\d*)?", text):
            seconds = sign * float(text)  # a bare number: seconds (Ollama wants a unit; a number is clearer)
        elif _DURATION.sub("", text) == "" and text:
            seconds = sign * sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION.findall(text))
        else:
            seconds = None
    else:
        seconds = None
    if seconds is None:
        raise ValueError(
            f'keep_alive {value!r} is not a duration: use seconds (300), a duration ("30s", "5m", "1h30m"), '
            "0 to unload at once, or -1 to keep the model loaded"
        )
    return math.inf if seconds < 0 else seconds


def merge(settings: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A section's settings with the command-line values that were given (None means not given)."""
    out = dict(settings)
    out.update({k: v for k, v in overrides.items() if v is not None})
    return out
