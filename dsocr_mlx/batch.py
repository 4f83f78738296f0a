"""Many inputs: expand files, folders and globs; run them page by page; write results without clobbering."""

from __future__ import annotations

import glob
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import pdf
from .options import OCROptions
from .pipeline import OCRModel, OCRResult, join_pages, save_pdf_results

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass
class Item:
    """One input as the user named it: a file to read, or the reason it cannot be read."""

    name: str
    path: Path | None = None
    error: str | None = None

    @property
    def is_pdf(self) -> bool:
        return self.path is not None and pdf.is_pdf(self.path)


def expand_inputs(specs: list[str]) -> list[Item]:
    """Files as given; folders to their images and PDFs (recursively, sorted); globs to their matches."""
    items: list[Item] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if any(c in spec for c in "*?["):
            matches = sorted(glob.glob(str(path), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                items.append(Item(spec, error="no file matches this pattern"))
            items += [Item(str(f), f) for f in files]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | {".pdf"})
            if not files:
                items.append(Item(spec, error="the folder holds no images or PDFs"))
            items += [Item(str(f), f) for f in files]
        elif path.is_file():
            items.append(Item(spec, path))
        else:
            items.append(Item(spec, error="file not found"))
    return items


def output_folder(out: Path, item: Item, used: set[Path]) -> Path:
    """``out/<stem>``, with ``-2``, ``-3``... when two inputs share a stem."""
    stem = item.path.stem if item.path else "input"
    folder, n = out / stem, 1
    while folder in used:
        n += 1
        folder = out / f"{stem}-{n}"
    used.add(folder)
    return folder


@dataclass
class ItemOutcome:
    item: Item
    results: list[OCRResult] = field(default_factory=list)
    error: str | None = None
    folder: Path | None = None
    exception: BaseException | None = None  # for --verbose tracebacks


def run_items(
    model: OCRModel,
    items: list[Item],
    options: OCROptions,
    out: Path | None = None,
    overwrite: bool = False,
    pages: str | None = None,
    on_page: Callable[[Item, OCRResult], None] | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Iterator[ItemOutcome]:
    """OCR every item in turn (pages one by one); a failing item is reported and the others go on.

    With ``out``, each item's artefacts go to their own folder; existing results are kept unless
    ``overwrite``. ``on_text`` streams the text of images as it is generated.
    """
    used: set[Path] = set()
    for item in items:
        outcome = ItemOutcome(item)
        if item.error:
            outcome.error = item.error
            yield outcome
            continue
        if out is not None:
            outcome.folder = output_folder(out, item, used)
            marker = outcome.folder / (f"{item.path.stem}.mmd" if item.is_pdf else "result.mmd")
            if marker.exists() and not overwrite:
                outcome.error = f"results exist in {outcome.folder}; pass --overwrite to replace them"
                yield outcome
                continue
        try:
            if item.is_pdf:
                for result in model.ocr_many([item.path], options=options, pages=pages):
                    outcome.results.append(result)
                    if on_page:
                        on_page(item, result)
                if outcome.folder is not None:
                    save_pdf_results(outcome.results, outcome.folder, item.path.stem, overwrite=True)
            else:
                result = model.ocr(item.path, options=options, on_text=on_text, source=str(item.path))
                outcome.results.append(result)
                if on_page:
                    on_page(item, result)
                if outcome.folder is not None:
                    result.save(outcome.folder, overwrite=True)
        except Exception as e:  # noqa: BLE001 - one bad input is one line; the batch goes on
            expected = isinstance(e, (ValueError, OSError))
            outcome.error, outcome.exception = str(e) if expected else f"{type(e).__name__}: {e}", e
        yield outcome


def render(outcome: ItemOutcome, fmt: str) -> str:
    """The text printed for one input: ``markdown``, ``json`` or ``text`` (no layout marks or figure links)."""
    results = outcome.results
    if fmt == "json":
        data = [r.to_dict() for r in results]
        return json.dumps(data if outcome.item.is_pdf else data[0], indent=1, ensure_ascii=False)
    if outcome.item.is_pdf:
        text = join_pages(results)
    else:
        text = results[0].text
    if fmt == "text":
        text = "\n".join(line for line in text.splitlines() if not line.startswith("![](images/"))
    return text
