"""The one options object: what to ask (task or prompt), how to read the image, and how to generate.

Every shell builds an :class:`OCROptions` and nothing else: ``config.toml`` loads into one, the CLI's
flags and the server's request fields are generated from its fields, and the pipeline reads only it.
Values are checked when it is built, so a bad mode or task fails before any model loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from . import pdf
from .modes import MODES, family_mode, mode_help
from .sampling import IMAGE_NGRAM, PDF_NGRAM, SamplingParams

TASKS = {
    "markdown": "<image>\n<|grounding|>Convert the document to markdown.",
    "ocr": "<image>\n<|grounding|>OCR this image.",
    "free": "<image>\nFree OCR.",
    "figure": "<image>\nParse the figure.",
    "describe": "<image>\nDescribe this image in detail.",
    "locate": "<image>\nLocate <|ref|>{ref}<|/ref|> in the image.",
}
DEFAULT_PROMPT = TASKS["markdown"]
OUTPUTS = ("markdown", "raw", "json")


class OptionError(ValueError):
    """A bad option value; ``option`` names the option."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def _option(
    default: Any, help: str, *, config: bool = True, cli: bool = True, request: bool = True, example: Any = None
) -> Any:
    """A field with where it may be set: config.toml, a CLI flag, a server request field."""
    return field(
        default=default, metadata={"help": help, "config": config, "cli": cli, "request": request, "example": example}
    )


@dataclass(frozen=True)
class OCROptions:
    """One OCR request's settings: task or prompt, mode, sampling, anti-repetition, stop strings, output."""

    task: str | None = _option(
        None, f"{', '.join(TASKS)} (the official prompts; locate needs ref; unset: markdown)", example="markdown"
    )
    prompt: str | None = _option(
        None, "a custom prompt with one <image> per image; replaces the task", config=False, request=False
    )
    ref: str | None = _option(None, "the text to find, for task locate", request=False, example="total")
    mode: str | None = _option(
        None, f"the resolution mode (unset: the model's official one). {mode_help()}", example="gundam"
    )
    max_new_tokens: int = _option(8192, "the most tokens generated per image or page")
    temperature: float = _option(0.0, "0 = greedy (the official setting)")
    top_p: float = _option(1.0, "nucleus sampling mass, in (0, 1]")
    top_k: int = _option(0, "sample among the k most likely tokens (0 = off)")
    seed: int | None = _option(None, "random seed for sampling (unset: a fresh one each run)", example=0)
    repetition_penalty: float = _option(1.0, "penalty on generated tokens (1 = off)")
    no_repeat_ngram_size: int | None = _option(
        None,
        f"n-gram ban size (unset: the official {IMAGE_NGRAM[0]} for images, {PDF_NGRAM[0]} for PDF pages; 0 = off)",
        example=IMAGE_NGRAM[0],
    )
    ngram_window: int | None = _option(
        None,
        f"n-gram ban window (unset: the official {IMAGE_NGRAM[1]} for images, {PDF_NGRAM[1]} for PDF pages)",
        example=IMAGE_NGRAM[1],
    )
    detect_loops: bool = _option(True, "stop a degenerate repetition early (finish reason repetition)")
    retry_on_repetition: bool = _option(
        True, "after a loop, retry once with stronger anti-repetition (not for streamed server responses)"
    )
    stop: tuple[str, ...] = _option(
        (), "stop strings: the text ends just before the first one found", example=["</table>"]
    )
    dpi: int = _option(pdf.DEFAULT_DPI, "PDF rendering resolution (the official 144)")
    output: str = _option("markdown", f"the text a server client gets: {', '.join(OUTPUTS)}", config=False, cli=False)
    ignore_eos: bool = _option(
        False, "keep generating past the end of text (benchmarks)", config=False, cli=False, request=False
    )

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, coerce(f.name, getattr(self, f.name)))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        if self.prompt is not None and self.task is not None:
            raise OptionError("prompt", "give either a prompt or a task, not both")
        if self.prompt is None:
            if (self.task or "markdown") not in TASKS:
                raise OptionError(
                    "task", f"unknown task {self.task!r}: choose one of {', '.join(TASKS)} or pass a prompt"
                )
            if self.task == "locate" and not self.ref:
                raise OptionError("ref", "the locate task needs the text to find (ref)")
        for name in ("prompt", "ref", "stop"):
            for text in (v,) if isinstance(v := getattr(self, name), str) else v or ():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise OptionError(name, f"{name} is not valid Unicode text (it holds a lone surrogate)") from None
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise OptionError("seed", f"seed must be between 0 and 2**64 - 1, got {self.seed}")
        if self.mode is not None and self.mode not in MODES:
            raise OptionError("mode", f"unknown mode {self.mode!r}: {mode_help()}")
        if self.output not in OUTPUTS:
            raise OptionError("output", f"unknown output {self.output!r}: choose one of {', '.join(OUTPUTS)}")
        if self.max_new_tokens < 1:
            raise OptionError("max_new_tokens", f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        try:
            pdf.check_dpi(self.dpi)
        except ValueError as e:
            raise OptionError("dpi", str(e)) from None
        if self.ngram_window is not None and self.ngram_window < 1:
            raise OptionError("ngram_window", f"ngram_window must be at least 1, got {self.ngram_window}")
        for pdf_page in (False, True):  # the sampling rules live in SamplingParams; run them once here
            try:
                self.sampling_params(pdf_page)
            except ValueError as e:
                name = next((f.name for f in dataclasses.fields(SamplingParams) if f.name in str(e)), "temperature")
                raise OptionError(name, str(e)) from None

    @property
    def prompt_text(self) -> str:
        """The prompt the model reads: the custom one, or the official prompt of the task."""
        if self.prompt is not None:
            return self.prompt
        task = self.task or "markdown"
        return TASKS[task].format(ref=self.ref) if task == "locate" else TASKS[task]

    def sampling_params(self, pdf_page: bool = False) -> SamplingParams:
        """The backend's sampling settings, with the official n-gram ban of an image or of a PDF page."""
        size, window = PDF_NGRAM if pdf_page else IMAGE_NGRAM
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            repetition_penalty=self.repetition_penalty,
            no_repeat_ngram_size=size if self.no_repeat_ngram_size is None else self.no_repeat_ngram_size,
            ngram_window=window if self.ngram_window is None else self.ngram_window,
        )

    def merged(self, **overrides: Any) -> OCROptions:
        """These options with ``overrides`` applied; None means "not given" and keeps the value here.

        The more specific layer wins between a prompt and a task: giving one clears the other.
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(given) - set(OPTION_NAMES))
        if unknown:
            raise OptionError(
                unknown[0], f"unknown option(s) {', '.join(unknown)}: the options are {', '.join(OPTION_NAMES)}"
            )
        if "prompt" in given and "task" not in given:
            given["task"] = None
        elif "task" in given and "prompt" not in given:
            given["prompt"] = None
        return dataclasses.replace(self, **given)

    def check_family(self, family: str) -> OCROptions:
        """These options if they apply to a model of ``family`` (read from its config.json); else
        :class:`OptionError`, e.g. a DeepSeek-OCR mode asked of DeepSeek-OCR-2."""
        try:
            family_mode(family, self.mode)
        except ValueError as e:
            raise OptionError("mode", str(e)) from None
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)
        }


# The kind of each option, read off its annotation ("int | None" -> int; tuple[str, ...] -> tuple).
_KINDS = {
    f.name: {"str": str, "int": int, "float": float, "bool": bool, "tuple[str, ...]": tuple}[f.type.split(" | ")[0]]
    for f in dataclasses.fields(OCROptions)
}
OPTION_NAMES = tuple(_KINDS)


def option_kind(name: str) -> type:
    """``bool``, ``int``, ``float``, ``str`` or ``tuple`` (a list of strings)."""
    return _KINDS[name]


def option_fields(where: str) -> list[dataclasses.Field]:
    """The options settable in ``where``: ``"config"``, ``"cli"`` or ``"request"``."""
    return [f for f in dataclasses.fields(OCROptions) if f.metadata[where]]


def coerce(name: str, value: Any, text: bool = False) -> Any:
    """``value`` as option ``name``'s type: from JSON/TOML values, or from strings (form fields) when ``text``.

    Raises:
        OptionError: the value has the wrong type.
    """
    kind = _KINDS.get(name)
    if kind is None:
        raise OptionError(name, f"unknown option {name!r}: the options are {', '.join(OPTION_NAMES)}")
    if value is None:
        return None
    want = {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "a list of strings"}[
        kind
    ]
    if text and isinstance(value, str) and kind is not str:
        raw = value.strip()
        if kind is tuple:
            return (raw,) if raw else ()
        if kind is bool and raw.lower() not in ("true", "false", "1", "0"):
            raise OptionError(name, f"{name} must be {want}, got {_shown(value)}")
        try:
            value = raw.lower() in ("true", "1") if kind is bool else kind(raw)
        except ValueError:
            raise OptionError(name, f"{name} must be {want}, got {_shown(value)}") from None
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        tuple: lambda v: isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v),
    }[kind]
    if not ok(value):
        raise OptionError(name, f"{name} must be {want}, got {_shown(value)}")
    if kind is float:
        if not math.isfinite(value):  # NaN passes every range check: refuse it and the infinities here
            raise OptionError(name, f"{name} must be a finite number, got {_shown(value)}")
        return float(value)
    if kind is tuple:
        return tuple(value)
    return value


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:40] + "..."


def build_prompt(prompt: str | None = None, task: str | None = None, ref: str | None = None) -> str:
    """The prompt text: a custom ``prompt``, or the official prompt of a named ``task`` (``markdown`` by default)."""
    return OCROptions(task=task, prompt=prompt, ref=ref).prompt_text
