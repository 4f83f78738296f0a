"""PDF input and output: pages rendered through pypdfium2, page ranges, the boxes-drawn layout PDF and the
searchable PDF (page images with an invisible text layer at the grounding boxes)."""

from __future__ import annotations

import ctypes
import html
import io
import math
import re
import struct
import threading
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .files import staged_file

if TYPE_CHECKING:
    from PIL import Image

    from .grounding import Block
    from .pipeline import OCRResult

# pdfium is not thread-safe (pypdfium2 says to serialise every call): the server reads PDFs on several threads.
PDFIUM = threading.RLock()
DEFAULT_DPI = 144  # the official script renders at zoom 2 (144 / 72)
PAGE_SEPARATOR = "\n<--- Page Split --->"  # the official script appends "\n" + this + "\n" after each page
MAX_PAGES = 2000
MAX_PAGE_PIXELS = 64_000_000  # a rendered page larger than this (e.g. a poster at high DPI) is refused


def is_pdf(path: str | Path) -> bool:
    path = Path(path)
    if path.suffix.lower() == ".pdf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(5) == b"%PDF-"
    except OSError:
        return False


MAX_PAGE_SPEC = 1000  # characters: a page selection longer than this is refused unread


def parse_pages(spec: str | None, count: int) -> list[int]:
    """``"1-3,7"`` -> zero-based page indices ``[0, 1, 2, 6]``; None or ``""`` means every page.

    Linear in the selection, whatever it holds; a repeated page counts once, in its first place.
    """
    if not spec:
        return list(range(count))
    if len(spec) > MAX_PAGE_SPEC:
        raise ValueError(f"the page selection is {len(spec)} characters long, more than {MAX_PAGE_SPEC}")
    shown = spec if len(spec) <= 40 else spec[:40] + "..."
    pages: list[int] = []
    seen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo_text, dash, hi_text = (t.strip() for t in part.partition("-"))
        if not (
            _number(lo_text) if not dash else (_number(lo_text) or not lo_text) and (_number(hi_text) or not hi_text)
        ):
            raise ValueError(f"page range {shown!r} is not like 1-3,7")
        lo = int(lo_text) if lo_text else 1
        hi = (int(hi_text) if hi_text else count) if dash else lo
        if lo < 1 or hi < lo:
            raise ValueError(f"page range {part[:40]!r} is empty or starts below 1")
        if lo > count:
            raise ValueError(f"page {lo} is past the end: the PDF has {count} page(s)")
        for p in range(lo - 1, min(hi, count)):
            if p not in seen:
                seen.add(p)
                pages.append(p)
    return pages


def _number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _open(path: Path):
    import pypdfium2 as pdfium

    if not path.is_file():
        raise FileNotFoundError(f"PDF {path} not found")
    try:
        with PDFIUM:
            return pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as e:
        # pdfium's last error is process-wide: its text may be an earlier document's, so it is not
        # repeated; the file itself tells encryption apart.
        if b"/Encrypt" in path.read_bytes():
            raise ValueError(f"{path} is encrypted: decrypt it first (for example qpdf --decrypt)") from None
        if "success" in str(e).lower():
            raise ValueError(f"{path} has no pages or a broken page tree") from None
        raise ValueError(f"{path} is not a readable PDF: it is damaged or not a PDF") from None


def page_count(path: str | Path) -> int:
    doc = _open(Path(path))
    with PDFIUM:
        try:
            return len(doc)
        finally:
            doc.close()


def check_dpi(dpi: int) -> None:
    """Refuse a rendering resolution outside 18 to 1200 DPI."""
    if not 18 <= dpi <= 1200:
        raise ValueError(f"dpi must be between 18 and 1200, got {dpi}")


def render_pages(
    path: str | Path, pages: str | None = None, dpi: int = DEFAULT_DPI, max_pages: int = MAX_PAGES
) -> Iterator[tuple[int, Image.Image]]:
    """Yield ``(page_index, RGB image)`` for the selected pages, rendered at ``dpi``, one at a time."""
    path = Path(path)
    check_dpi(dpi)
    doc = _open(path)
    try:
        with PDFIUM:
            count = len(doc)
        if count == 0:
            raise ValueError(f"{path} has no pages")
        selected = parse_pages(pages, count)
        if len(selected) > max_pages:
            raise ValueError(
                f"{path} has {len(selected)} pages selected, more than the limit of {max_pages}; choose a page range"
            )
        for index in selected:
            scale = dpi / 72
            with PDFIUM:  # one page at a time under the lock: other threads' documents go on between pages
                page = doc[index]
                width, height = page.get_size()
                if width * height * scale * scale > MAX_PAGE_PIXELS:
                    page.close()
                    raise ValueError(
                        f"{path} page {index + 1} would render to {int(width * scale)}x"
                        f"{int(height * scale)} pixels at {dpi} DPI; lower the DPI"
                    )
                image = page.render(scale=scale).to_pil().convert("RGB")
                page.close()
            image.info["dpi"] = (dpi, dpi)  # the searchable PDF gives the page its size in points back
            yield index, image
    finally:
        with PDFIUM:
            doc.close()


def save_images_as_pdf(images: list[Image.Image], path: str | Path) -> None:
    """Write pictures as the pages of one PDF (the official ``_layouts.pdf``)."""
    if not images:
        return
    first, *rest = [im.convert("RGB") for im in images]
    first.save(path, format="PDF", save_all=True, append_images=rest, resolution=DEFAULT_DPI)


# --------------------------------------------------------------------------------------------------------------
# The searchable PDF
#
# Each page is the page image (JPEG) with the text of every grounding block written over it in text render
# mode 3 (invisible), as OCRmyPDF does for Tesseract. The text uses a "glyphless" font, as Tesseract's PDF
# renderer and Chrome's searchify do: a tiny TrueType program whose one glyph every character code shows (never
# painted in mode 3), and a ToUnicode map that gives each code its character back, so any script (CJK, emoji)
# is extracted exactly and no font covering it is needed. pypdfium2 writes the PDF: pdfium's FPDFText_LoadCidType2Font
# takes such a font with its ToUnicode and CIDToGIDMap as they are.
# --------------------------------------------------------------------------------------------------------------

JPEG_QUALITY = 85  # visually lossless on scans at a fraction of PNG's size, as img2pdf/OCRmyPDF users expect
IMAGE_DPI = 72  # an image that records no resolution: one pixel is one point
MAX_PAGE_POINTS = 14_400  # the largest page side readers accept (200 inches); bigger pages get a higher DPI
_ASCENT = 0.8  # the glyphless font's ascent and descent (800 / -200 units per 1000): the em box is the line
_GLYPH_ASPECT = 0.5  # a printed glyph is about half as wide as its line is high: how many lines a block holds
_MAX_STRETCH = 1.0  # wider glyphs than an em look like gaps between columns to pdftotext, which splits lines


def _sfnt_checksum(data: bytes) -> int:
    data += b"\0" * (-len(data) % 4)
    return sum(struct.unpack(f">{len(data) // 4}I", data)) & 0xFFFFFFFF


def glyphless_font() -> bytes:
    """A minimal TrueType font: an empty ``.notdef`` and one glyph, a rectangle, that every code shows.

    The glyph has an outline (never painted in render mode 3) because text extractors tell lines apart by
    their glyph boxes: pdfium drops a line as a duplicate of the one above when both have empty boxes.
    """
    name_strings = {1: "GlyphLessFont", 2: "Regular", 4: "GlyphLessFont", 6: "GlyphLessFont"}
    records, strings = b"", b""
    for name_id, text in name_strings.items():
        data = text.encode("utf-16-be")
        records += struct.pack(">6H", 3, 1, 0x409, name_id, len(data), len(strings))
        strings += data
    cmap_format4 = struct.pack(">12H", 4, 24, 0, 2, 2, 0, 0, 0xFFFF, 0, 0xFFFF, 1, 0)  # only the closing segment
    tables = {
        b"OS/2": struct.pack(
            ">HhHHH11h10s4I4sHHHhhhHH2I",
            *(1, 1000, 400, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 50, 300, 0, b"\0" * 10, 0, 0, 0, 0, b"DSOC", 0x40),
            *(0x20, 0xFFFF, 800, -200, 0, 800, 200, 1, 0),
        ),
        b"cmap": struct.pack(">HHHHI", 0, 1, 3, 1, 12) + cmap_format4,
        # Glyph 1: one contour, the rectangle (0, -150)-(1000, 750), as on-curve points with word deltas: a
        # tenth of an em short of the line at each end, so the boxes of stacked lines never touch.
        b"glyf": struct.pack(">h4hHH4B8h", 1, 0, -150, 1000, 750, 3, 0, 1, 1, 1, 1, 0, 0, 1000, 0, -150, 900, 0, -900)
        + b"\0\0",
        b"head": struct.pack(
            ">IIIIHHqqhhhhHHhhh", 0x10000, 0x10000, 0, 0x5F0F3CF5, 0x000B, 1000, 0, 0, 0, -150, 1000, 750, 0, 8, 2, 0, 0
        ),
        b"hhea": struct.pack(">IhhhHhhhhhhhhhhhH", 0x10000, 800, -200, 0, 1000, *[0] * 3, 1, *[0] * 7, 2),
        b"hmtx": struct.pack(">HhHh", 1000, 0, 1000, 0),
        b"loca": struct.pack(">HHH", 0, 0, 18),  # half offsets: .notdef is empty, glyph 1 takes 36 bytes
        b"maxp": struct.pack(">I14H", 0x10000, 2, 4, 1, 0, 0, 2, *[0] * 8),
        b"name": struct.pack(">HHH", 0, len(name_strings), 6 + 12 * len(name_strings)) + records + strings,
        b"post": struct.pack(">IIhhIIIII", 0x30000, 0, -100, 50, 1, 0, 0, 0, 0),
    }
    count = len(tables)
    shift = count.bit_length() - 1
    directory = struct.pack(">IHHHH", 0x10000, count, 16 << shift, shift, count * 16 - (16 << shift))
    body, offset, head_at = b"", 12 + 16 * count, 0
    for tag in sorted(tables):
        data = tables[tag]
        head_at = offset + len(body) if tag == b"head" else head_at
        directory += struct.pack(">4sIII", tag, _sfnt_checksum(data), offset + len(body), len(data))
        body += data + b"\0" * (-len(data) % 4)
    font = bytearray(directory + body)
    font[head_at + 8 : head_at + 12] = struct.pack(">I", (0xB1B0AFBA - _sfnt_checksum(bytes(font))) & 0xFFFFFFFF)
    return bytes(font)


def _to_unicode(chars: Sequence[str]) -> bytes:
    """The ToUnicode CMap that maps code ``i + 1`` to ``chars[i]`` (UTF-16BE, surrogate pairs beyond the BMP)."""
    lines = [
        "/CIDInit /ProcSet findresource begin",
        "12 dict begin",
        "begincmap",
        "/CIDSystemInfo << /Registry (Adobe) /Ordering (UCS) /Supplement 0 >> def",
        "/CMapName /Adobe-Identity-UCS def",
        "/CMapType 2 def",
        "1 begincodespacerange",
        "<0000> <FFFF>",
        "endcodespacerange",
    ]
    for start in range(0, len(chars), 100):  # a bfchar section holds at most 100 entries
        chunk = chars[start : start + 100]
        lines.append(f"{len(chunk)} beginbfchar")
        lines += [f"<{start + i + 1:04X}> <{c.encode('utf-16-be').hex().upper()}>" for i, c in enumerate(chunk)]
        lines.append("endbfchar")
    lines += ["endcmap", "CMapName currentdict /CMap defineresource pop", "end", "end"]
    return ("\n".join(lines) + "\n").encode("ascii")


_TABLE_CELL = re.compile(r"</t[dh]\s*>", re.IGNORECASE)
_TABLE_ROW = re.compile(r"</tr\s*>|<br\s*/?>", re.IGNORECASE)
_TAG = re.compile(r"<[^<>]*>")
_HEADING = re.compile(r"^#{1,6}\s+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def plain_lines(text: str) -> list[str]:
    """A block's text as the text layer holds it: HTML tables as rows of cells, tags, heading marks and
    ``**`` removed, entities decoded, one entry per non-empty line."""
    text = _TAG.sub("", _TABLE_ROW.sub("\n", _TABLE_CELL.sub(" ", text)))
    lines = []
    for line in html.unescape(text).splitlines():
        line = " ".join(_CONTROL.sub(" ", _HEADING.sub("", line.strip()).replace("**", "")).split())
        if line:
            lines.append(line)
    return lines


def _split_line(line: str, parts: int) -> list[str]:
    """``line`` in ``parts`` pieces of about equal length, broken between words (between characters where a
    line has fewer words than pieces, as in Chinese or Japanese)."""
    tokens = re.findall(r"\S+\s*", line)
    if len(tokens) < parts:
        tokens = list(line)
    pieces, current, done = [], "", 0
    for token in tokens:
        current += token
        done += len(token)
        if len(pieces) < parts - 1 and done >= len(line) * (len(pieces) + 1) / parts:
            pieces.append(current.strip())
            current = ""
    pieces.append(current.strip())
    return [p for p in pieces if p]


_MIRRORED = dict(zip("()[]{}<>«»‹›", ")(][}{><»«›‹"))  # the brackets a right-to-left run shows mirrored


def visual_order(line: str) -> str:
    """``line`` in the order its characters are laid out left to right: the Unicode bidirectional algorithm
    for one paragraph without explicit embeddings (rules W1-W7, N1-N2, I1-I2, L2, and L4 for brackets).

    PDF text is positioned glyph by glyph, so extractors (pdfium, poppler) read a right-to-left run back
    to front: Arabic or Hebrew written in logical order would come back reversed.
    """
    kinds = []
    for c in line:
        kind = unicodedata.bidirectional(c)
        kind = {"AL": "R", "AN": "EN", "LRE": "ON", "RLE": "ON", "LRO": "ON", "RLO": "ON", "PDF": "ON"}.get(kind, kind)
        if kind == "NSM":  # W1: a combining mark takes its base's type
            kind = kinds[-1] if kinds else "ON"
        kinds.append(kind if kind in ("L", "R", "EN", "ES", "ET", "CS") else "ON")
    if not any(k == "R" for k in kinds):
        return line  # nothing right-to-left: already in visual order
    base = next((k for k in kinds if k in ("L", "R")), "L")
    for i, k in enumerate(kinds):  # W4, W5: separators between numbers and terminators next to them join them
        if k in ("ES", "CS") and 0 < i < len(kinds) - 1 and kinds[i - 1] == kinds[i + 1] == "EN":
            kinds[i] = "EN"
    for order in (range(len(kinds)), range(len(kinds) - 1, -1, -1)):
        for i in order:
            if kinds[i] == "ET" and any(0 <= j < len(kinds) and kinds[j] == "EN" for j in (i - 1, i + 1)):
                kinds[i] = "EN"
    strong = base
    for i, k in enumerate(kinds):  # W7: numbers after left-to-right text are left-to-right
        strong = k if k in ("L", "R") else strong
        kinds[i] = "ON" if k in ("ES", "ET", "CS") else ("L" if k == "EN" and strong == "L" else k)
    i = 0
    while i < len(kinds):  # N1, N2: neutrals between two of one direction take it, else the paragraph's
        if kinds[i] != "ON":
            i += 1
            continue
        j = i
        while j < len(kinds) and kinds[j] == "ON":
            j += 1
        before = base if i == 0 else ("R" if kinds[i - 1] in ("R", "EN") else "L")
        after = base if j == len(kinds) else ("R" if kinds[j] in ("R", "EN") else "L")
        kinds[i:j] = [before if before == after else base] * (j - i)
        i = j
    odd = base == "R"
    levels = [(1 + (k != "R")) if odd else {"L": 0, "R": 1, "EN": 2}[k] for k in kinds]  # I1, I2
    chars = [_MIRRORED.get(c, c) if level % 2 else c for c, level in zip(line, levels)]  # L4
    for level in range(max(levels), 0, -1):  # L2: reverse every run at this level or higher
        i = 0
        while i < len(chars):
            if levels[i] < level:
                i += 1
                continue
            j = i
            while j < len(chars) and levels[j] >= level:
                j += 1
            chars[i:j], levels[i:j] = chars[i:j][::-1], levels[i:j][::-1]
            i = j
    return "".join(chars)


@dataclass
class TextLine:
    """One line of the invisible text layer, in points from the page's top-left corner."""

    text: str
    x: float  # left edge
    top: float  # top of the line's em box
    size: float  # font size: the line's height
    width: float  # the width the text is stretched over (the box width, unless that would space it out)


def layout_text(blocks: Sequence[Block], scale: float, page_size: tuple[float, float]) -> list[TextLine]:
    """Where each block's text goes: its lines stacked in its box (``box_px`` times ``scale``, clamped to
    the page), a long line wrapped into as many lines as the box's shape suggests, each line as tall as its
    share of the box and stretched to the box width. Blocks without text (figures) give nothing; a span with
    several boxes gives its text once, in its first box."""
    out, previous = [], None
    page_w, page_h = page_size
    for block in blocks:
        lines = plain_lines(block.text)
        if not lines or (block.label, block.text) == previous:
            continue
        previous = (block.label, block.text)
        x1, y1, x2, y2 = block.box_px
        x1, x2 = (min(max(v * scale, 0.0), page_w) for v in (x1, x2))
        y1, y2 = (min(max(v * scale, 0.0), page_h) for v in (y1, y2))
        box_w, box_h = x2 - x1, y2 - y1
        if box_w < 1 or box_h < 1:
            continue
        total = sum(len(line) for line in lines)
        wanted = max(len(lines), round(math.sqrt(_GLYPH_ASPECT * total * box_h / box_w)))
        visual = [p for line in lines for p in _split_line(line, max(1, round(wanted * len(line) / total)))]
        size = box_h / len(visual)
        for i, text in enumerate(visual):
            stretched = min(box_w, len(text) * size * _MAX_STRETCH)
            out.append(TextLine(visual_order(text), x1, y1 + i * size, size, stretched))
    return out


def image_dpi(image: Image.Image) -> float:
    """The resolution a page image records (pages rendered here record their DPI, image files may state one),
    else 72 (a pixel is a point); raised where the page would be larger than PDF readers accept."""
    try:
        dpi = float(image.info.get("dpi", (IMAGE_DPI,))[0])
    except (TypeError, ValueError, IndexError):
        dpi = IMAGE_DPI
    if not (math.isfinite(dpi) and 18 <= dpi <= 4800):
        dpi = IMAGE_DPI
    return max(dpi, max(image.size) * 72 / MAX_PAGE_POINTS)


def save_searchable_pdf(results: list[OCRResult], path: str | Path) -> Path:
    """Write a searchable PDF: one page per result with an image (a PDF's pages or one image), the image as
    the visible page, the text of its grounding blocks as an invisible, selectable text layer over the boxes.

    A page is the image's size at the DPI it records (PDF pages rendered here: the DPI they were rendered
    at), else at 72 DPI. The file is written aside and renamed into place when complete.

    Raises:
        ValueError: no result has an image, or the text uses more than 65535 different characters.
    """
    pages = []
    for result in results:
        if result.image is None:
            continue
        image = result.image.convert("RGB")
        scale = 72 / image_dpi(image)
        size = (image.width * scale, image.height * scale)
        pages.append((image, size, layout_text(result.blocks, scale, size)))
    if not pages:
        raise ValueError("no page images to write a searchable PDF from")
    chars = list(dict.fromkeys(c for _, _, lines in pages for line in lines for c in line.text))
    if len(chars) > 0xFFFF:
        raise ValueError(f"the text uses {len(chars)} different characters, more than a PDF font holds (65535)")
    with PDFIUM:
        return _write_searchable(pages, chars, Path(path))


def _write_searchable(pages: list, chars: list[str], path: Path) -> Path:
    """The searchable PDF of laid-out ``pages`` (pdfium calls: under :data:`PDFIUM`)."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as raw

    code = {c: i + 1 for i, c in enumerate(chars)}
    font_data, to_unicode = glyphless_font(), _to_unicode(chars)
    cid_to_gid = b"\0\0" + b"\0\1" * len(chars)  # code 0 is .notdef, every other code the empty glyph
    doc = pdfium.PdfDocument.new()
    try:
        font = raw.FPDFText_LoadCidType2Font(
            doc,
            (ctypes.c_ubyte * len(font_data)).from_buffer_copy(font_data),
            len(font_data),
            to_unicode,
            (ctypes.c_ubyte * len(cid_to_gid)).from_buffer_copy(cid_to_gid),
            len(cid_to_gid),
        )
        if not font:
            raise ValueError("pdfium could not load the text layer's font")
        try:
            for image, (width, height), lines in pages:
                page = doc.new_page(width, height)
                jpeg = io.BytesIO()
                image.save(jpeg, format="JPEG", quality=JPEG_QUALITY)
                jpeg.seek(0)
                picture = pdfium.PdfImage.new(doc)
                picture.load_jpeg(jpeg, inline=True)
                picture.set_matrix(pdfium.PdfMatrix().scale(width, height))
                page.insert_obj(picture)
                for line in lines:
                    text = raw.FPDFPageObj_CreateTextObj(doc, font, line.size)
                    codes = (ctypes.c_uint * len(line.text))(*(code[c] for c in line.text))
                    raw.FPDFText_SetCharcodes(text, codes, len(line.text))
                    raw.FPDFTextObj_SetTextRenderMode(text, raw.FPDF_TEXTRENDERMODE_INVISIBLE)
                    # Every glyph is one em wide, so the horizontal scale fits the line to its width exactly.
                    stretch = line.width / (len(line.text) * line.size)
                    baseline = height - line.top - _ASCENT * line.size
                    raw.FPDFPageObj_Transform(text, stretch, 0, 0, 1, line.x, baseline)
                    raw.FPDFPage_InsertObject(page, text)
                page.gen_content()
                page.close()
        finally:
            raw.FPDFFont_Close(font)
        with staged_file(path) as staged:
            doc.save(str(staged))
    finally:
        doc.close()
    return path
