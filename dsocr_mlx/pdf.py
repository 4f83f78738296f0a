"""PDF input and output: pages rendered through pypdfium2, page ranges, and the boxes-drawn layout PDF."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

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
        count = len(doc)
        if count == 0:
            raise ValueError(f"{path} has no pages")
        selected = parse_pages(pages, count)
        if len(selected) > max_pages:
            raise ValueError(
                f"{path} has {len(selected)} pages selected, more than the limit of {max_pages}; choose a page range"
            )
        for index in selected:
            page = doc[index]
            width, height = page.get_size()
            scale = dpi / 72
            if width * height * scale * scale > MAX_PAGE_PIXELS:
                raise ValueError(
                    f"{path} page {index + 1} would render to {int(width * scale)}x"
                    f"{int(height * scale)} pixels at {dpi} DPI; lower the DPI"
                )
            image = page.render(scale=scale).to_pil().convert("RGB")
            page.close()
            yield index, image
    finally:
        doc.close()


def save_images_as_pdf(images: list[Image.Image], path: str | Path) -> None:
    """Write pictures as the pages of one PDF (the official ``_layouts.pdf``)."""
    if not images:
        return
    first, *rest = [im.convert("RGB") for im in images]
    first.save(path, format="PDF", save_all=True, append_images=rest, resolution=DEFAULT_DPI)
