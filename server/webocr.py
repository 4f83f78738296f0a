"""What an OCR request of the web page runs on the inference worker, and the JSON its entries answer with.

One job per model: the upload's pages (an image, or a PDF's selected pages) one after another, each page's
text passed on as it is generated, and the official artefacts written into the entry's staging folder
(``result.mmd``, ``result_ori.mmd``, ``result_with_boxes.jpg``, ``images/N.jpg``, ``result.json`` for an
image; ``{stem}.mmd``, ``{stem}_det.mmd``, ``{stem}_layouts.pdf``, ``images/``, ``{stem}.json`` for a PDF,
plus ``boxes/N.jpg`` per page). The JSON follows the community DeepSeek-OCR Web UI fork
(kazuph/DeepSeek-OCR-WebApp: ``history_id``, ``variants``, ``input_images``, ``{name, path, url}`` image
lists) so its scripts work unchanged; what it adds (pages, blocks, usage, finish reasons) is extra keys.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image

from dsocr_mlx import grounding, pdf
from dsocr_mlx.modes import DEFAULT_MODE, FAMILY_NAMES, MODES_BY_FAMILY, OCR1
from dsocr_mlx.options import OCROptions
from dsocr_mlx.pipeline import OCRResult, join_pages, save_pdf_results
from dsocr_mlx.processing import check_image, decode_image

from .catalog import ModelEntry
from .protocol import finish_reason, usage
from .serving import pdf_upload, stream_page

PREVIEW_CHARS = 240
THUMB_SIDE = 1400  # the page image a stream shows while a PDF page is read (the stored one is full size)
_FIGURE_LINK = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
JPEG_MAGIC = b"\xff\xd8"


@dataclass
class Upload:
    """An uploaded file, checked: an image (``pages`` None) or a PDF and its selected zero-based pages."""

    data: bytes
    filename: str
    pages: list[int] | None
    spec: str | None = None

    @property
    def count(self) -> int:
        return 1 if self.pages is None else len(self.pages)


def inspect_upload(data: bytes, filename: str, max_pixels: int, spec: str | None, max_pages: int) -> Upload:
    """Check an upload before any job is queued: an image from its header, a PDF from its page selection.

    Raises:
        ValueError: not a readable image or PDF, too many pixels or pages, a bad page selection.
    """
    if not data.startswith(b"%PDF-"):
        if spec:
            raise ValueError("'pages' selects pages of a PDF, and this file is an image")
        check_image(data, max_pixels)
        return Upload(data, filename, None)
    with pdf_upload(data, max_pages, spec) as path:
        selected = pdf.parse_pages(spec, pdf.page_count(path))
    return Upload(data, filename, selected, spec)


def safe_stem(filename: str) -> str:
    """A file name's stem with only letters, digits, ``_ . -`` (for artefact names; never empty)."""
    stem = _UNSAFE_NAME.sub("_", Path(filename.replace("\\", "/")).stem).strip("._")[:60]
    return stem or "document"


def _page_images(upload: Upload, dpi: int, max_pixels: int, max_pages: int) -> Iterator[tuple[int | None, Image.Image]]:
    if upload.pages is None:
        yield None, decode_image(upload.data, max_pixels)
        return
    with pdf_upload(upload.data, max_pages, upload.spec) as path:
        yield from pdf.render_pages(path, upload.spec, dpi, max_pages)


def _save_input(staging: Path, n: int, image: Image.Image, upload: Upload) -> str:
    """The page image as the page shows it (decoded and turned upright), stored once for all models."""
    jpeg = upload.pages is None and upload.data.startswith(JPEG_MAGIC)  # a photo stays a JPEG (a tenth the size)
    name = (
        f"{safe_stem(upload.filename)}.{'jpg' if jpeg else 'png'}" if upload.pages is None else f"page-{n + 1:03d}.png"
    )
    path = staging / "input" / name
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        if jpeg:
            image.save(path, quality=92)
        else:
            image.save(path)
    return f"input/{name}"


def _thumbnail_url(image: Image.Image) -> str:
    small = image.copy()
    small.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def block_dicts(result: OCRResult) -> list[dict[str, Any]]:
    """The page's blocks in JSON, each with ``span``: the grounding span it came from (a span with several
    boxes gives several blocks that share one text)."""
    spans = []
    for i, (_, _, _, det) in enumerate(grounding.find_spans(result.raw_text)):
        spans += [i] * len(grounding.parse_boxes(det) or ())
    if len(spans) != len(result.blocks):  # parse_blocks skipped or split differently: one span per block
        spans = list(range(len(result.blocks)))
    return [b.to_dict() | {"span": s} for b, s in zip(result.blocks, spans)]


def plain_text(markdown: str) -> str:
    """Markdown as plain lines: no figure links, tags, heading marks or emphasis."""
    return "\n".join(pdf.plain_lines(_FIGURE_LINK.sub("", markdown)))


def variant_work(
    upload: Upload, options: OCROptions, staging: Path, slug: str, limits: dict[str, Any], sent: set[int]
) -> Callable[[Any, Callable[[Any], None]], dict[str, Any]]:
    """The job of one model: events ``("begin",)``, ``("page", n, info)``, ``("delta", n, text)`` (often
    empty: every token is a point where a cancelled job stops), ``("page_done", n, page)``; it returns the
    variant's metadata. ``sent`` holds the pages whose picture an earlier model's job already streamed."""
    max_pixels, max_pages = limits["max_image_pixels"], limits["max_pdf_pages"]

    def work(model: Any, emit: Callable[[Any], None]) -> dict[str, Any]:
        start = time.perf_counter()
        emit(("begin",))
        folder = staging / slug
        folder.mkdir()
        results, pages = [], []
        with contextlib.closing(_page_images(upload, options.dpi, max_pixels, max_pages)) as images:
            for n, (index, image) in enumerate(images):
                info: dict[str, Any] = {"page": None if index is None else index + 1, "image_size": list(image.size)}
                if index is not None and n not in sent:  # an image's page shows the file it picked
                    info["image"] = _thumbnail_url(image)
                    sent.add(n)
                emit(("page", n, info))
                result = stream_page(model, [image], options, lambda text, n=n: emit(("delta", n, text)), index)
                page = info | {
                    "input": _save_input(staging, n, image, upload),
                    "text_markdown": result.text,
                    "text_raw": result.raw_text,
                    "blocks": block_dicts(result),
                    "finish_reason": result.finish_reason,
                    "usage": result.usage,
                    "timings": result.timings,
                    "bounding_image": "result_with_boxes.jpg" if index is None else f"boxes/{n + 1}.jpg",
                }
                page.pop("image", None)
                if index is None:
                    result.image = image  # OCRResult.save draws the boxes and crops the figures
                else:
                    (folder / "boxes").mkdir(exist_ok=True)
                    grounding.draw_blocks(image, result.blocks).save(folder / page["bounding_image"], quality=90)
                emit(("page_done", n, page))
                results.append(result)
                pages.append(page)
        files = _save_artefacts(results, pages, folder, staging, upload)
        text = results[0].text if upload.pages is None else join_pages(results)
        return {
            "slug": slug,
            "options": {k: v for k, v in options.to_dict().items() if k not in ("ignore_eos", "output")},
            "pages": pages,
            "text_markdown": text,
            "text_raw": results[0].raw_text if upload.pages is None else join_pages(results, raw=True),
            "text_plain": plain_text(text),
            "finish_reason": finish_reason(results),
            "usage": usage(results),
            "elapsed_seconds": round(time.perf_counter() - start, 3),
            "files": files,
            "crops": _crops(folder, upload),
        }

    return work


def _save_artefacts(results: list[OCRResult], pages: list[dict], folder: Path, staging: Path, upload: Upload) -> dict:
    """The official artefacts of the variant (a PDF's pages are read back from their stored images, one
    at a time, as the official layout PDF is drawn)."""
    if upload.pages is None:
        results[0].save(folder)
        results[0].image = None
        return {"markdown": "result.mmd", "raw": "result_ori.mmd", "json": "result.json"}
    stem = safe_stem(upload.filename)
    opened = [Image.open(staging / p["input"]) for p in pages]
    try:
        for r, im in zip(results, opened):
            r.image = im
        save_pdf_results(results, folder, stem)
    finally:
        for r, im in zip(results, opened):
            r.image = None
            im.close()
    return {
        "markdown": f"{stem}.mmd",
        "raw": f"{stem}_det.mmd",
        "json": f"{stem}.json",
        "layouts": f"{stem}_layouts.pdf",
    }


def _crops(folder: Path, upload: Upload) -> list[dict[str, Any]]:
    """The figure crops, in page and figure order, with the (zero-based) position of their page."""
    where = {index: n for n, index in enumerate(upload.pages or [])}
    crops = []
    for path in (folder / "images").glob("*.jpg"):
        prefix, _, number = path.stem.rpartition("_")
        if not number.isdigit() or (prefix and not prefix.isdigit()):
            continue
        n = 0 if not prefix else where.get(int(prefix), 0)
        crops.append((n, int(number), {"path": f"images/{path.name}", "page": n}))
    return [c for _, _, c in sorted(crops, key=lambda c: c[:2])]


# ---- the JSON of entries ----------------------------------------------------------------------------------


def model_label(entry: ModelEntry) -> str:
    """A readable name: family, where it comes from, and its precision (``DeepSeek-OCR · repo · Q4``)."""
    family = FAMILY_NAMES.get(entry.family or "", "DeepSeek-OCR")
    return " · ".join(p for p in (family, entry.repo_id or entry.id, entry.quantization) if p)


def model_info(entry: ModelEntry, loaded: bool, configured_mode: str | None) -> dict[str, Any]:
    """A ``GET /api/models`` item: the fork's ``key``, ``label``, ``description``, ``options``, plus the
    family, its resolution modes and the one used by default (``[ocr] mode`` where it is one of them)."""
    family = entry.family or OCR1
    modes = list(MODES_BY_FAMILY[family])
    return {
        "key": entry.id,
        "label": model_label(entry),
        "description": entry.path,
        "options": [],
        "family": family,
        "modes": modes,
        "default_mode": configured_mode if configured_mode in modes else DEFAULT_MODE[family],
        "loaded": loaded,
    }


def iso_time(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def preview(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"


def variant_response(entry_id: str, v: dict[str, Any]) -> dict[str, Any]:
    """One model's output with the URLs of its images (``?model=`` names the variant)."""
    base, q = f"/api/history/{entry_id}", "?model=" + quote(v["model"], safe="")
    bounding = [
        {"name": Path(p["bounding_image"]).name, "path": p["bounding_image"], "page": n}
        | {"url": f"{base}/image/bounding/{p['bounding_image']}{q}"}
        for n, p in enumerate(v["pages"])
    ]
    crops = [c | {"name": Path(c["path"]).name, "url": f"{base}/image/crop/{c['path']}{q}"} for c in v["crops"]]
    first = f"{base}/image/bounding{q}" if bounding else None
    pages = [
        p | {"bounding_image_url": b["url"], "input_image_url": f"{base}/image/{p['input']}"}
        for p, b in zip(v["pages"], bounding)
    ]
    return {
        "model": v["model"],
        "label": v["label"],
        "text_plain": v["text_plain"],
        "text_markdown": v["text_markdown"],
        "text_raw": v["text_raw"],
        "bounding_image_url": first,
        "bounding_images": bounding,
        "layout_image_url": None,
        "layout_images": [],
        "crops": crops,
        "preview_image_url": first or (crops[0]["url"] if crops else None),
        "preview": preview(v["text_plain"]),
        "elapsed_seconds": v["elapsed_seconds"],
        "finish_reason": v["finish_reason"],
        "usage": v["usage"],
        "pages": pages,
        "blocks": [b for p in v["pages"] for b in p["blocks"]],
        "download_url": f"{base}/download{q}",
        "metadata": {"options": v["options"], "files": v["files"], "elapsed_seconds": v["elapsed_seconds"]},
    }


def input_images(entry_id: str, meta: dict[str, Any]) -> list[dict[str, Any]]:
    base = f"/api/history/{entry_id}/image"
    return [
        {"name": Path(i["path"]).name, "path": i["path"].removeprefix("input/"), "url": f"{base}/{i['path']}"}
        | {"page": i["page"]}
        for i in meta["input_images"]
    ]


def entry_response(entry_id: str, created: float, meta: dict[str, Any]) -> dict[str, Any]:
    """``POST /api/ocr`` and ``GET /api/history/{id}``: the first model's output at the top level, as the
    fork has it, and every model's in ``variants``."""
    variants = [variant_response(entry_id, v) for v in meta["variants"]]
    first = variants[0]
    top = ("text_plain", "text_markdown", "bounding_image_url", "bounding_images", "crops", "preview_image_url")
    return {
        "history_id": entry_id,
        "created_at": iso_time(created),
        "filename": meta["filename"],
        **{k: first[k] for k in top},
        "preview": first["preview"],
        "variants": variants,
        "input_images": input_images(entry_id, meta),
        "metadata": {
            "input": meta["filename"],
            "input_files": [i["path"].removeprefix("input/") for i in meta["input_images"]],
            "models": [v["model"] for v in variants],
            "warnings": meta["warnings"],
        },
    }


def list_item(entry_id: str, created: float, meta: dict[str, Any]) -> dict[str, Any]:
    """A ``GET /api/history`` item: the fork's fields plus the page count and the first page's image."""
    first = variant_response(entry_id, meta["variants"][0])
    inputs = input_images(entry_id, meta)
    return {
        "id": entry_id,
        "filename": meta["filename"],
        "created_at": iso_time(created),
        "preview": first["preview"],
        "preview_image_url": first["preview_image_url"],
        "input_image_url": inputs[0]["url"] if inputs else None,
        "models": [v["model"] for v in meta["variants"]],
        "pages": len(inputs),
    }
