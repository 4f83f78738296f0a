"""The model families and their official resolution modes (no heavy imports: the CLI validates with them).

DeepSeek-OCR has five named modes; DeepSeek-OCR-2 has one (its ``infer()`` defaults and its vLLM
``config.py``), called ``default`` here. A family is read from ``config.json``, never from a folder name.
"""

from __future__ import annotations

from dataclasses import dataclass

OCR1, OCR2 = "deepseek-ocr", "deepseek-ocr-2"
FAMILY_NAMES = {OCR1: "DeepSeek-OCR", OCR2: "DeepSeek-OCR-2"}


@dataclass(frozen=True)
class Mode:
    """A resolution mode of the official code.

    ``base_size`` is the global view, ``image_size`` the tile (and the no-tile threshold: an image with
    both sides at most ``image_size`` gets no tiles); ``min_tiles``..``max_tiles`` bound the tile grid.
    ``newlines``: DeepSeek-OCR closes every row of image tokens with ``image_newline``; DeepSeek-OCR-2
    has none and reads one learnt query per token instead.
    """

    base_size: int
    image_size: int
    crop_mode: bool
    min_tiles: int = 2
    max_tiles: int = 9
    newlines: bool = True


MODES_BY_FAMILY: dict[str, dict[str, Mode]] = {
    OCR1: {
        "tiny": Mode(512, 512, False),
        "small": Mode(640, 640, False),
        "base": Mode(1024, 1024, False),
        "large": Mode(1280, 1280, False),
        "gundam": Mode(1024, 640, True),
    },
    OCR2: {"default": Mode(1024, 768, True, min_tiles=2, max_tiles=6, newlines=False)},
}
DEFAULT_MODE = {OCR1: "gundam", OCR2: "default"}

# Every mode name of every family: what an options object accepts before it knows the model.
MODES: dict[str, Mode] = {name: m for modes in MODES_BY_FAMILY.values() for name, m in modes.items()}


def family_mode(family: str, mode: str | None) -> Mode:
    """The :class:`Mode` named ``mode`` of ``family`` (None: the family's official default).

    Raises:
        ValueError: the family has no such mode; the message names the valid choices.
    """
    modes = MODES_BY_FAMILY[family]
    name = DEFAULT_MODE[family] if mode is None else mode
    if name in modes:
        return modes[name]
    valid = f"its only mode is {next(iter(modes))!r}" if len(modes) == 1 else f"choose one of {', '.join(modes)}"
    others = [f for f, m in MODES_BY_FAMILY.items() if name in m]
    why = f"it is a mode of {FAMILY_NAMES[others[0]]}" if others else "there is no such mode"
    raise ValueError(f"{FAMILY_NAMES[family]} has no mode {name!r} ({why}): {valid}")


def mode_help() -> str:
    """The mode choices per family, for help texts."""
    return "; ".join(
        f"{FAMILY_NAMES[f]}: {', '.join(m)} (default {DEFAULT_MODE[f]})" for f, m in MODES_BY_FAMILY.items()
    )
