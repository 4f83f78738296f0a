"""What a server job runs on the inference thread: a request's pages through the library's one front end.

The client text is the ``output`` deltas of :meth:`OCRModel.stream_ocr`; they add up to each page's
final text, the same text :meth:`OCRModel.ocr` returns for the same options.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dsocr_mlx import pdf
from dsocr_mlx.files import process_alive as _alive
from dsocr_mlx.options import OCROptions
from dsocr_mlx.pipeline import OCRResult, join_pages
from dsocr_mlx.processing import check_image, decode_image


def stream_page(
    model: Any, images: list[Any], options: OCROptions, on_delta: Callable[[str], None], page: int | None = None
) -> OCRResult:
    """Run one generation, passing each token's client text delta (often empty) to ``on_delta``."""
    result = None
    for response in model.stream_ocr(images or None, options=options, page=page):
        # Called for every token, even with nothing to show: it is where a cancelled job stops. After a
        # retry the deltas start again (only a non-streamed response retries, and it sends the result).
        on_delta(response.output)
        result = response.result or result
    assert result is not None, "stream_ocr ends with a result"
    result.image = None  # responses need the text, blocks and usage; the page's pixels go now
    return result


def _user() -> str:
    return str(os.getuid()) if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")


# Uploaded PDFs live in one folder per server process, inside one private folder per user.
UPLOADS = Path(tempfile.gettempdir()) / f"dsocr-uploads-{_user()}"


def uploads_folder() -> Path:
    """This process's upload folder, in the user's private folder (made 0700, refused if it is a symbolic
    link or belongs to someone else)."""
    UPLOADS.mkdir(mode=0o700, exist_ok=True)
    info = os.lstat(UPLOADS)
    if stat.S_ISLNK(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
        raise OSError(f"{UPLOADS} is not this user's own folder; remove it and restart the server")
    folder = UPLOADS / str(os.getpid())
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def clean_stale_uploads() -> None:
    """Remove the upload folders of server processes that are gone (killed before they could clean up)."""
    if not UPLOADS.is_dir() or UPLOADS.is_symlink():
        return
    for folder in UPLOADS.iterdir():
        if folder.name.isdigit() and not folder.is_symlink() and not _alive(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def pdf_upload(data: bytes, max_pages: int, pages: str | None = None) -> Iterator[Path]:
    """Uploaded PDF bytes as a temporary file (PDFs render from paths), checked against ``max_pages``.

    Error messages say "the PDF" rather than the temporary file's name.
    """
    with tempfile.TemporaryDirectory(prefix="upload-", dir=uploads_folder()) as tmp:
        path = Path(tmp) / "upload.pdf"
        path.write_bytes(data)
        try:
            count = len(pdf.parse_pages(pages, pdf.page_count(path)))
            if count > max_pages:
                raise ValueError(f"the PDF has {count} pages selected, more than the limit of {max_pages}")
            yield path
        except ValueError as e:
            raise ValueError(str(e).replace(str(path), "the PDF")) from None


def check_document(data: bytes, max_pixels: int, pages: str | None, max_pages: int) -> None:
    """Refuse an upload before it is queued: an image from its header (format, pixels), a PDF from its
    page count and selection. The pixels are decoded only when the job runs, so the requests waiting in
    the queue hold compressed bytes, not decoded pages.

    Raises:
        ValueError: an unreadable image or PDF, too many pixels, a bad page selection, too many pages.
    """
    if not data.startswith(b"%PDF-"):
        check_image(data, max_pixels)
        return
    with pdf_upload(data, max_pages, pages):
        pass


def document_text(results: list[OCRResult], output: str) -> str:
    """What a request's streamed text adds up to: one image's final text, or a PDF's pages each followed
    by the official page separator."""
    if len(results) == 1 and results[0].page is None:
        return results[0].output_text(output)
    return join_pages(results, output=output)


def stream_request(
    model: Any,
    images: list[Any],
    pdf_data: bytes | None,
    options: OCROptions,
    on_delta: Callable[[str], None],
    max_pages: int = pdf.MAX_PAGES,
) -> list[OCRResult]:
    """One request's generations: the images together, or a PDF page by page.

    A PDF's text is the official combined Markdown: each page followed by the page separator.
    """
    if pdf_data is None:
        return [stream_page(model, images, options, on_delta)]
    results = []
    with pdf_upload(pdf_data, max_pages) as path:
        for index, image in pdf.render_pages(path, None, options.dpi, max_pages):
            results.append(stream_page(model, [image], options, on_delta, page=index))
            on_delta(f"\n{pdf.PAGE_SEPARATOR}\n")
    return results


def ocr_document(
    model: Any,
    data: bytes,
    options: OCROptions,
    *,
    max_pixels: int,
    pages: str | None = None,
    max_pages: int = pdf.MAX_PAGES,
    on_text: Callable[[str], None] | None = None,
) -> list[OCRResult]:
    """OCR of an uploaded image, or of an uploaded PDF's pages (checked by :func:`check_document`)."""
    if not data.startswith(b"%PDF-"):
        return [model.ocr(decode_image(data, max_pixels), options=options, on_text=on_text)]
    with pdf_upload(data, max_pages, pages) as path:
        return list(model.ocr_many([path], options=options, pages=pages, on_text=on_text))
