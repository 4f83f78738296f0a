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
    page: int = 0  # zero-based, as OCRResult.page (an image is page 0)

    def to_dict(self) -> dict:
        """The block in JSON: ``page`` counts from 1 as ``--pages`` does, ``page_index`` from 0 (figure names)."""
        return {
            "label": self.label,
            "text": self.text,
            "box": list(self.box),
            "box_px": list(self.box_px),
            "page": self.page + 1,
            "page_index": self.page,
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


# Distinct colours (Okabe-Ito and Tableau), one per label kind; the layout labels DeepSeek-OCR writes keep
# theirs on every page, other labels (the OCR task labels lines with their text) take the ones left.
_PALETTE = (
    (0, 114, 178),
    (213, 94, 0),
    (0, 158, 115),
    (148, 103, 189),
    (230, 159, 0),
    (204, 121, 167),
    (214, 39, 40),
    (23, 190, 207),
    (140, 86, 75),
    (127, 127, 127),
    (188, 189, 34),
    (86, 180, 233),
)
_KNOWN_LABELS = ("text", "title", "image", "table", "image_caption", "table_caption", "sub_title", "equation")
_MAX_LABEL_CHARS = 30  # a longer label (an OCR-task line) is cut with an ellipsis


def label_colours(labels: list[str]) -> dict[str, tuple[int, int, int]]:
    """A colour per label kind, distinct while the palette lasts."""
    kinds = list(dict.fromkeys(labels))
    colours = {k: _PALETTE[_KNOWN_LABELS.index(k)] for k in kinds if k in _KNOWN_LABELS}
    free = [c for c in _PALETTE if c not in colours.values()] or list(_PALETTE)
    others = [k for k in kinds if k not in colours]
    colours.update({k: free[i % len(free)] for i, k in enumerate(others)})
    return colours


def _luminance(colour: tuple[int, int, int]) -> float:
    channels = [c / 255 for c in colour]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast_ratio(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """The WCAG contrast ratio of two colours (1 to 21; 4.5 is the floor for normal text)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def label_font_size(size: tuple[int, int]) -> int:
    """Label type size in pixels: grows with the picture (24 px on a 144-DPI Letter page), never below 12."""
    return max(12, round(max(size) / 66))


@dataclass
class Label:
    """A block's label as drawn: its text on a filled rectangle in the block's colour."""

    text: str
    rect: tuple[int, int, int, int]  # x1, y1, x2, y2 (exclusive) in the picture
    colour: tuple[int, int, int]  # the background: the box colour
    ink: tuple[int, int, int]  # the text: black or white, whichever contrasts more with the colour


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def _label_type(size: tuple[int, int]) -> tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, int]:
    """The labels' font and the padding around their text, for a picture of ``size``."""
    points = label_font_size(size)
    try:
        font = ImageFont.load_default(size=points)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, ImportError, OSError):
        font = ImageFont.load_default()
    return font, max(2, points // 5)


def layout_labels(size: tuple[int, int], blocks: list[Block]) -> list[tuple[Block, Label]]:
    """Where each drawable block's label goes: above its box's top-left corner, or inside the box where there
    is no room above or the space above holds another box, moved along the box's edge, then up or down,
    until it covers no label placed before it (and, where it can, no other box)."""
    width, height = size
    font, pad = _label_type(size)
    colours = label_colours([b.label for b in blocks])
    boxes = [_drawable(b.box_px, size) for b in blocks]
    placed: list[tuple[Block, Label]] = []
    for block, box in zip(blocks, boxes):
        if box is None:
            continue
        text = block.label if len(block.label) <= _MAX_LABEL_CHARS else block.label[: _MAX_LABEL_CHARS - 1] + "…"
        left, top, right, bottom = font.getbbox(text)
        w, h = min(right - left + 2 * pad, width), min(bottom - top + 2 * pad, height)
        x1, y1, x2, y2 = box
        starts = [(x1, y1 - h), (x1, y1), (x2 - w, y1 - h), (x2 - w, y1), (x1, y2 - h), (x1, y2)]
        others = [b for b in boxes if b is not None and b is not box]
        taken = [label.rect for _, label in placed]
        best, best_cost = None, None
        for x, y in starts:  # the nearest places: the one over the least of other boxes, first on ties
            rect = _inside((x, y, x + w, y + h), size)
            if not any(_overlap(rect, t) for t in taken):
                cost = sum(_overlap(rect, other) for other in others)
                if best_cost is None or cost < best_cost:
                    best, best_cost = rect, cost
        if best is None:  # all taken by earlier labels: the nearest free place up or down the box's edges
            slides = (
                _inside((x, y, x + w, y + h), size)
                for k in range(1, height // h + 1)
                for y in (y1 - (k + 1) * h, y1 + k * h)
                for x in (x1, x2 - w)
            )
            best = next((rect for rect in slides if not any(_overlap(rect, t) for t in taken)), None)
        if best is None:  # more labels than the picture holds: the preferred place, overlapping
            best = _inside((x1, y1 - h, x1 + w, y1), size)
        colour = colours[block.label]
        ink = max(((0, 0, 0), (255, 255, 255)), key=lambda c: contrast_ratio(c, colour))
        placed.append((block, Label(text, best, colour, ink)))
    return placed


def _inside(rect: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``rect`` moved (not resized) to lie within the picture."""
    x1, y1, x2, y2 = rect
    dx = min(max(x1, 0), size[0] - (x2 - x1)) - x1
    dy = min(max(y1, 0), size[1] - (y2 - y1)) - y1
    return x1 + dx, y1 + dy, x2 + dx, y2 + dy


def _drawable(box_px: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The box clamped to the picture; None if it is reversed or wholly outside the picture."""
    x1, y1, x2, y2 = box_px
    if x2 < x1 or y2 < y1 or x1 >= size[0] or y1 >= size[1] or x2 < 0 or y2 < 0:
        return None
    return max(x1, 0), max(y1, 0), min(x2, size[0] - 1), min(y2, size[1] - 1)


def draw_blocks(image: Image.Image, blocks: list[Block]) -> Image.Image:
    """The official ``result_with_boxes`` picture: outlined, lightly filled boxes, each labelled with its kind
    on a filled tag in the box colour (type scaled to the picture, tags never over one another)."""
    image = image.convert("RGB")
    drawn = image.copy()
    overlay = Image.new("RGBA", drawn.size, (0, 0, 0, 0))
    fill = ImageDraw.Draw(overlay)
    line = max(2, label_font_size(image.size) // 8)
    labels = layout_labels(image.size, blocks)
    for block, label in labels:
        box = _drawable(block.box_px, image.size)
        fill.rectangle(box, fill=label.colour + (24,))
    drawn.paste(overlay, (0, 0), overlay)
    draw = ImageDraw.Draw(drawn)
    for block, label in labels:
        box = _drawable(block.box_px, image.size)
        draw.rectangle(box, outline=label.colour, width=2 * line if block.label == "title" else line)
    font, pad = _label_type(image.size)
    for _, label in labels:
        x1, y1, x2, y2 = label.rect
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=label.colour)
        left, top, _, _ = font.getbbox(label.text)
        draw.text((x1 + pad - left, y1 + pad - top), label.text, font=font, fill=label.ink)
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
