"""Grounding spans of the model's output: a strict parser, the official Markdown clean-up, box drawing.

DeepSeek-OCR marks layout blocks as ``<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>`` with
coordinates normalised to 0..999. The official code ``eval``s the box list; this parser accepts only
lists of four-number boxes and keeps anything else as plain text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_REF, _REF_END, _DET_END = "<|ref|>", "<|/ref|><|det|>", "<|/det|>"
_NUMBER = r"\s*(-?[0-9]+(?:\.[0-9]+)?)\s*"
_BOX = re.compile(r"\s*\[" + ",".join([_NUMBER] * 4) + r"\]\s*")
_MAX_BOXES = 256  # a span listing more is not a real layout block


@dataclass
class Block:
    """One grounded layout block."""

    label: str
    text: str  # the text the block introduces (up to the next span), stripped
    box: tuple[float, float, float, float]  # normalised 0..999, as the model writes it
    box_px: tuple[int, int, int, int]  # pixels of the original image, mapped as the official code does
    page: int = 0

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "text": self.text,
            "box": list(self.box),
            "box_px": list(self.box_px),
            "page": self.page,
        }


def find_spans(raw: str) -> list[tuple[int, int, str, str]]:
    """``(start, end, label, boxes text)`` of every complete span, in linear time.

    Matches what the official regex ``<|ref|>(.*?)<|/ref|><|det|>(.*?)<|/det|>`` finds, without its
    quadratic backtracking on unterminated spans.
    """
    spans, pos = [], 0
    while (i := raw.find(_REF, pos)) >= 0:
        j = raw.find(_REF_END, i + len(_REF))
        if j < 0:
            break
        k = raw.find(_DET_END, j + len(_REF_END))
        if k < 0:
            break
        spans.append((i, k + len(_DET_END), raw[i + len(_REF) : j], raw[j + len(_REF_END) : k]))
        pos = k + len(_DET_END)
    return spans


def parse_boxes(text: str) -> list[tuple[float, float, float, float]] | None:
    """``"[[1, 2, 3, 4], [5, 6, 7, 8]]"`` -> boxes; None for anything that is not exactly that shape."""
    text = text.strip()
    if len(text) < 2 or text[0] != "[" or text[-1] != "]":
        return None
    inner = text[1:-1]
    boxes, pos = [], 0
    while pos < len(inner):
        m = _BOX.match(inner, pos)
        if not m:
            return None
        box = tuple(float(v) for v in m.groups())
        if not all(math.isfinite(v) for v in box):
            return None
        boxes.append(box)
        pos = m.end()
        if pos < len(inner):
            if inner[pos] != ",":
                return None
            pos += 1
        if len(boxes) > _MAX_BOXES:
            return None
    return boxes or None


def to_pixels(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """The official mapping ``int(v / 999 * size)``."""
    x1, y1, x2, y2 = box
    return int(x1 / 999 * width), int(y1 / 999 * height), int(x2 / 999 * width), int(y2 / 999 * height)


def parse_blocks(raw: str, width: int, height: int, page: int = 0) -> list[Block]:
    """Every well-formed span of ``raw`` with its boxes; malformed spans are skipped (kept as text)."""
    spans = find_spans(raw)
    blocks = []
    for i, (_, end, label, det) in enumerate(spans):
        boxes = parse_boxes(det)
        if boxes is None:
            continue
        text = raw[end : spans[i + 1][0] if i + 1 < len(spans) else len(raw)].strip()
        for box in boxes:
            blocks.append(Block(label, text, box, to_pixels(box, width, height), page))
    return blocks


def is_figure(span: str) -> bool:
    """Whether the official clean-up turns a span into a figure link: the span's text holds
    ``<|ref|>image<|/ref|>`` anywhere (its label is ``image``, or a nested span's is)."""
    return "<|ref|>image<|/ref|>" in span


def clean_markdown(raw: str, image_prefix: str = "", pdf_page: bool = False) -> str:
    """The official post-processing: figure spans become ``![](images/N.jpg)`` links, other spans go.

    ``image_prefix`` names figures per page (``"3_"`` gives ``images/3_0.jpg``) and ``pdf_page`` also
    collapses blank lines at each removed span, as the official PDF script does.
    """
    text = raw
    figures, others = [], []
    for start, end, _, _ in find_spans(raw):
        (figures if is_figure(raw[start:end]) else others).append(raw[start:end])
    for i, span in enumerate(figures):
        text = text.replace(span, f"![](images/{image_prefix}{i}.jpg)\n")
    for span in others:
        text = text.replace(span, "").replace("\\coloneqq", ":=").replace("\\eqqcolon", "=:")
        if pdf_page:
            text = text.replace("\n\n\n\n", "\n\n").replace("\n\n\n", "\n\n")
    return text


def _colour(index: int) -> tuple[int, int, int]:
    # Deterministic where the official code draws random colours.
    return (37 * index % 200, 91 * index % 200, (53 * index + 120) % 255)


def draw_blocks(image: Image.Image, blocks: list[Block]) -> Image.Image:
    """The official ``result_with_boxes`` picture: outlined, lightly filled boxes with their labels."""
    image = image.convert("RGB")
    drawn = image.copy()
    draw = ImageDraw.Draw(drawn)
    overlay = Image.new("RGBA", drawn.size, (0, 0, 0, 0))
    fill = ImageDraw.Draw(overlay)
    font = ImageFont.load_default()
    labels = sorted({b.label for b in blocks})
    for block in blocks:
        colour = _colour(labels.index(block.label))
        x1, y1, x2, y2 = block.box_px
        if x2 < x1 or y2 < y1:
            continue
        # Coordinates far outside the picture would overflow PIL's C ints; the visible result is the same.
        x1, x2 = (min(max(v, -8), image.width + 8) for v in (x1, x2))
        y1, y2 = (min(max(v, -8), image.height + 8) for v in (y1, y2))
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=4 if block.label == "title" else 2)
        fill.rectangle([x1, y1, x2, y2], fill=colour + (20,))
        ty = max(0, y1 - 15)
        left, top, right, bottom = draw.textbbox((0, 0), block.label, font=font)
        draw.rectangle([x1, ty, x1 + right - left, ty + bottom - top], fill=(255, 255, 255))
        draw.text((x1, ty), block.label, font=font, fill=colour)
    drawn.paste(overlay, (0, 0), overlay)
    return drawn


def save_figures(image: Image.Image, blocks: list[Block], folder: Path, prefix: str = "") -> list[Path]:
    """Crop every ``image`` block into ``folder/{prefix}{N}.jpg``, numbered like the Markdown links."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    figures = [b for b in blocks if b.label == "image"]
    for i, block in enumerate(figures):
        x1, y1, x2, y2 = block.box_px
        x1, x2 = max(0, x1), min(image.width, x2)
        y1, y2 = max(0, y1), min(image.height, y2)
        if x2 - x1 < 1 or y2 - y1 < 1:  # reversed, empty or wholly outside the picture
            continue
        path = folder / f"{prefix}{i}.jpg"
        image.convert("RGB").crop((x1, y1, x2, y2)).save(path)
        paths.append(path)
    return paths
