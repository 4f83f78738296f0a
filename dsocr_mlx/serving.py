"""What a server runs on its inference thread: OCR streamed as a client sees it, and uploaded documents.

Streamed deltas add up to the final text, which is what :meth:`OCRModel.ocr` returns for the same settings.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import grounding, pdf
from .sampling import IMAGE_NGRAM, PDF_NGRAM

OUTPUTS = ("markdown", "raw", "json")
_SPAN_OPEN = "<|ref|>"


class TextStream:
    """Turns raw model text, delta by delta, into the text a client gets, emitting only what is final.

    Held back until known: leading and trailing whitespace (the final text is stripped), an open
    grounding span (Markdown drops it or turns it into a figure link), and a possible start of a stop string.
    """

    def __init__(self, transform: Callable[[str], str] = lambda s: s, stop: list[str] | tuple[str, ...] = ()):
        self.transform = transform
        self.stop = [s for s in stop if s]
        self.raw = ""
        self.sent = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add raw model text; returns the new final client text (possibly empty)."""
        start = max(0, len(self.raw) - max((len(s) for s in self.stop), default=0))
        self.raw += delta
        hits = [i for i in (self.raw.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.raw, self.stopped = self.raw[: min(hits)], True
            return ""
        text = self.raw.lstrip()
        cut = len(text.rstrip())
        if self.stop:
            cut = max(0, min(cut, len(text) - max(len(s) for s in self.stop) + 1))
        text = text[:cut]
        span = text.rfind(_SPAN_OPEN)
        if span >= 0 and "<|/det|>" not in text[span:]:
            text = text[:span]
        for k in range(len(_SPAN_OPEN) - 1, 0, -1):
            if text.endswith(_SPAN_OPEN[:k]):
                text = text[:-k]
                break
        return self._advance(self.transform(text))

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        return self._advance(self.final_text)

    @property
    def final_text(self) -> str:
        return self.transform(self.raw.strip())

    def _advance(self, text: str) -> str:
        # Only ever append: a text that rewrites what was sent (rare) waits for the end.
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def markdown_transform(page: int | None = None) -> Callable[[str], str]:
    """The official clean-up of ``OCRModel.ocr`` (figure links, PDF pages' blank-line collapse)."""
    prefix = f"{page}_" if page is not None else ""

    def transform(raw: str) -> str:
        text = grounding.clean_markdown(raw, prefix)
        if page is not None and "\n\n\n" in text:
            text = text.replace("\n\n\n\n", "\n\n").replace("\n\n\n", "\n\n")
        return text

    return transform


@dataclass
class OCROptions:
    """One request's generation settings, shared by every endpoint."""

    prompt: str | None = None
    task: str | None = None
    ref: str | None = None
    mode: str = "gundam"
    max_new_tokens: int = 8192
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    no_repeat_ngram_size: int | None = None
    ngram_window: int | None = None
    detect_loops: bool = True
    output: str = "markdown"


@dataclass
class StreamedPage:
    """The end of one image's (or PDF page's) generation."""

    text: str
    raw_text: str
    finish_reason: str
    prompt_tokens: int
    image_tokens: int
    completion_tokens: int
    blocks: list[grounding.Block]
    page: int | None = None


def stream_page(model: Any, images: list[Any], options: OCROptions, on_delta: Callable[[str], None],
                page: int | None = None) -> StreamedPage:
    """Run one generation on the calling thread, passing each token's final text delta (often empty) to ``on_delta``.

    PDF pages (``page`` set) use the official PDF n-gram defaults and figure names, as ``ocr_many`` does.
    With ``output="json"`` the text is one JSON object (``text``, ``blocks``) sent at the end.
    """
    from .pipeline import build_prompt

    if options.output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, not {options.output!r}")
    size, window = PDF_NGRAM if page is not None else IMAGE_NGRAM
    if options.no_repeat_ngram_size is not None:
        size = options.no_repeat_ngram_size
    if options.ngram_window is not None:
        window = options.ngram_window
    stream = TextStream(markdown_transform(page) if options.output != "raw" else lambda s: s, options.stop)
    last = None
    # No retry after a loop: streamed text cannot be taken back, so the loop ends with finish reason "repetition".
    for last in model.stream_ocr(
        images or None, build_prompt(options.prompt, options.task, options.ref), mode=options.mode,
        max_new_tokens=options.max_new_tokens, temperature=options.temperature, top_p=options.top_p,
        seed=options.seed, no_repeat_ngram_size=size, ngram_window=window, detect_loops=options.detect_loops,
        retry_on_repetition=False,
    ):
        delta = stream.feed(last.text)
        # Called for every token, even with nothing to show: it is where a cancelled job stops.
        on_delta(delta if options.output != "json" else "")
        if stream.stopped:
            break
    assert last is not None, "stream_ocr yields at least one response"
    tail = stream.finish()
    raw = stream.raw.strip()
    blocks = grounding.parse_blocks(raw, images[0].width, images[0].height, page or 0) if images else []
    text = stream.final_text
    if options.output == "json":
        tail = text = json.dumps({"text": text, "blocks": [b.to_dict() for b in blocks]}, ensure_ascii=False)
    if tail:
        on_delta(tail)
    finish = "stop" if stream.stopped else last.finish_reason or "length"
    return StreamedPage(text, raw, finish, last.prompt_tokens, last.image_tokens, last.generation_tokens, blocks,
                        page)


@contextlib.contextmanager
def pdf_upload(data: bytes, max_pages: int, pages: str | None = None) -> Iterator[Path]:
    """Uploaded PDF bytes as a temporary file (PDFs render from paths), checked against ``max_pages``.

    Error messages say "the PDF" rather than the temporary file's name.
    """
    with tempfile.TemporaryDirectory(prefix="dsocr-") as tmp:
        path = Path(tmp) / "upload.pdf"
        path.write_bytes(data)
        try:
            count = len(pdf.parse_pages(pages, pdf.page_count(path)))
            if count > max_pages:
                raise ValueError(f"the PDF has {count} pages selected, more than the limit of {max_pages}")
            yield path
        except ValueError as e:
            raise ValueError(str(e).replace(str(path), "the PDF")) from None


def stream_request(model: Any, images: list[Any], pdf_data: bytes | None, options: OCROptions,
                   on_delta: Callable[[str], None], dpi: int = pdf.DEFAULT_DPI,
                   max_pages: int = pdf.MAX_PAGES) -> list[StreamedPage]:
    """One request's generations on the calling thread: the images together, or a PDF page by page.

    A PDF's streamed text is the official combined Markdown: each page followed by the page separator.
    """
    if pdf_data is None:
        return [stream_page(model, images, options, on_delta)]
    pages = []
    with pdf_upload(pdf_data, max_pages) as path:
        for index, image in pdf.render_pages(path, None, dpi, max_pages):
            pages.append(stream_page(model, [image], options, on_delta, page=index))
            on_delta(f"\n{pdf.PAGE_SEPARATOR}\n")
    return pages


def ocr_document(model: Any, data: bytes, *, max_pixels: int, pages: str | None = None, dpi: int = pdf.DEFAULT_DPI,
                 max_pages: int = pdf.MAX_PAGES, **kwargs: Any) -> list[Any]:
    """:meth:`OCRModel.ocr` of an uploaded image, or :meth:`OCRModel.ocr_many` of an uploaded PDF's pages.

    Raises:
        ValueError: an unreadable image or PDF, too many pixels, or more than ``max_pages`` pages selected.
    """
    from .remote import decode_image

    if not data.startswith(b"%PDF-"):
        return [model.ocr(decode_image(data, max_pixels), **kwargs)]
    with pdf_upload(data, max_pages, pages) as path:
        return list(model.ocr_many([path], pages=pages, dpi=dpi, **kwargs))
