"""The resolution modes of the official DeepSeek-OCR code (no heavy imports: the CLI validates with them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    """A resolution mode of the official code: global view size, tile size, and whether to tile."""

    base_size: int
    image_size: int
    crop_mode: bool


MODES: dict[str, Mode] = {
    "tiny": Mode(512, 512, False),
    "small": Mode(640, 640, False),
    "base": Mode(1024, 1024, False),
    "large": Mode(1280, 1280, False),
    "gundam": Mode(1024, 640, True),
}
