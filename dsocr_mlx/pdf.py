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


def parse_pages(spec: str | None, count: int) -> list[int]:
    """``"1-3,7"`` -> zero-based page indices ``[0, 1, 2, 6]``; None or ``""`` means every page."""
    if not spec:
        return list(range(count))
    pages: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo_text, hi_text = part.split("-", 1)
                lo = int(lo_text) if lo_text.strip() else 1
                hi = int(hi_text) if hi_text.strip() else count
            else:
                lo = hi = int(part)
        except ValueError:
            raise ValueError(f"page range {spec!r} is not like 1-3,7") from None
        if lo < 1 or hi < lo:
            raise ValueError(f"page range {part!r} is empty or starts below 1")
        if lo > count:
            raise ValueError(f"page {lo} is past the end: the PDF has {count} page(s)")
        pages.extend(p - 1 for p in range(lo, min(hi, count) + 1) if p - 1 not in pages)
    return pages


def _open(path: Path):
    import pypdfium2 as pdfium

    if not path.is_file():
        raise FileNotFoundError(f"PDF {path} not found")
    try:
        return pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as e:
        message = str(e)
        # pdfium may repeat an earlier failure's message, so look for encryption in the file itself.
        if "password" in message.lower() and b"/Encrypt" in path.read_bytes():
            raise ValueError(f"{path} is encrypted: decrypt it first (for example qpdf --decrypt)") from None
        if "success" in message.lower():
            raise ValueError(f"{path} has no pages or a broken page tree") from None
        raise ValueError(f"{path} is not a readable PDF ({message})") from None


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
