"""Many inputs: expand files, folders and globs; run them page by page; write each input's results aside
and move them into place when complete, so an interrupted batch resumes where it stopped."""

from __future__ import annotations

import glob
import json
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import pdf
from .files import staged_folder
from .options import OCROptions
from .pipeline import GenerationResponse, OCRModel, OCRResult, join_pages, save_pdf_results

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass
class Item:
    """One input as the user named it: a file to read, or the reason it cannot be read."""

    name: str
    path: Path | None = None
    error: str | None = None
    pages: int = 1  # the pages it is expected to give (see :func:`count_pages`)

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


def count_pages(items: list[Item], pages: str | None = None) -> int:
    """Set each item's expected page count (1 for an image, the selected pages of a PDF, 1 for a PDF that
    cannot be read: its error comes when it runs) and return the total."""
    for item in items:
        item.pages = 1
        if item.error is None and item.is_pdf:
            try:
                item.pages = len(pdf.parse_pages(pages, pdf.page_count(item.path)))
            except (ValueError, OSError):
                pass
    return sum(item.pages for item in items)


def output_folder(out: Path, item: Item, used: set[Path]) -> Path:
    """``out/<stem>``, with ``-2``, ``-3``... when two inputs share a stem."""
    stem = item.path.stem if item.path else "input"
    folder, n = out / stem, 1
    while folder in used:
        n += 1
        folder = out / f"{stem}-{n}"
    used.add(folder)
    return folder


def marker_name(item: Item) -> str:
    """The file whose presence says an input's results are complete (written last)."""
    return f"{item.path.stem}.mmd" if item.is_pdf else "result.mmd"


def searchable_name(item: Item) -> str:
    """The searchable PDF of an input: ``<stem>_searchable.pdf`` for a PDF, ``result_searchable.pdf`` for an image."""
    return f"{item.path.stem}_searchable.pdf" if item.is_pdf else "result_searchable.pdf"


def _own_names(item: Item) -> set[str]:
    if item.is_pdf:
        stem = item.path.stem
        names = {f"{stem}.mmd", f"{stem}_det.mmd", f"{stem}_layouts.pdf", f"{stem}.json"}
    else:
        names = {"result.mmd", "result_ori.mmd", "result_with_boxes.jpg", "result.json"}
    return names | {searchable_name(item), "images"}


def result_state(folder: Path, item: Item) -> tuple[str, list[str]]:
    """What ``folder`` holds for ``item``: ``("absent" | "done" | "partial" | "foreign", names)``.

    ``done``: complete results (the marker file is there). ``partial``: only files dsocr writes, without
    the marker (a run stopped before it finished, by an older version). ``foreign``: anything else, whose
    names come back: it is never replaced.
    """
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        return "foreign", [folder.name]
    if not folder.is_dir():
        return "absent", []
    own = _own_names(item)
    names = sorted(p.name for p in folder.iterdir())
    # Hidden staging folders of an interrupted save are dsocr's too.
    foreign = [n for n in names if n not in own and not (n.startswith(".") and ".partial-" in n)]
    if foreign:
        return "foreign", foreign
    return ("done" if marker_name(item) in names else "partial"), []


@dataclass
class ItemOutcome:
    """What became of one input: its results, or why it failed, or that it was done before."""

    item: Item
    results: list[OCRResult] = field(default_factory=list)
    error: str | None = None
    folder: Path | None = None
    exception: BaseException | None = None  # for --verbose tracebacks
    index: int = 0  # counted from 1, in the order of the inputs
    skipped: bool = False  # complete results were already in ``folder``
    seconds: float = 0.0

    @property
    def truncated(self) -> list[OCRResult]:
        """Pages that stopped at the token limit (finish reason ``length``): their text is cut."""
        return [r for r in self.results if r.finish_reason == "length"]

    @property
    def looped(self) -> list[OCRResult]:
        """Pages stopped by a repetition loop (finish reason ``repetition``): their text ends early."""
        return [r for r in self.results if r.finish_reason == "repetition"]

    def warning(self) -> str | None:
        """One line on the pages whose text is cut short (token limit, repetition loop), or None."""
        parts = []
        if self.truncated:
            tokens = max(r.generated_tokens for r in self.truncated)
            parts.append(
                f"{self._which(self.truncated)} hit the token limit ({tokens} tokens) and may be cut; "
                "raise --max-new-tokens if there is more text"
            )
        if self.looped:
            parts.append(f"{self._which(self.looped)} ended early in a repetition loop")
        return "; ".join(parts) or None

    def _which(self, results: list[OCRResult]) -> str:
        if not self.item.is_pdf:
            return "the text"
        pages = [str((r.page or 0) + 1) for r in results]
        return f"page {pages[0]}" if len(pages) == 1 else f"pages {', '.join(pages)}"


class BatchEvents(Protocol):
    """What :func:`run_items` reports while it works (``dsocr_mlx.progress.BatchDisplay`` draws them)."""

    def item_start(self, index: int, item: Item) -> None: ...
    def page_start(self, position: int, count: int, page: int | None) -> None: ...
    def token(self, response: GenerationResponse) -> None: ...
    def text(self, delta: str) -> None: ...
    def restart(self) -> None: ...
    def page_done(self, result: OCRResult) -> None: ...
    def item_done(self, outcome: ItemOutcome) -> None: ...


class _NoEvents:
    def __getattr__(self, name: str):
        return lambda *args: None


def run_items(
    model: OCRModel,
    items: list[Item],
    options: OCROptions,
    out: Path | None = None,
    *,
    overwrite: bool = False,
    skip_existing: bool = True,
    pages: str | None = None,
    searchable_pdf: bool = False,
    events: BatchEvents | None = None,
    batch_size: int = 1,
) -> Iterator[ItemOutcome]:
    """OCR every item, page by page, ``batch_size`` pages decoding together; outcomes come in input order.

    A failing item is reported and the others go on. With ``out``, each item's artefacts go to their own
    folder ``out/<stem>``, written into a hidden folder beside it and renamed into place when complete
    (with ``<stem>_searchable.pdf`` or ``result_searchable.pdf`` when ``searchable_pdf``), so an
    interrupted run leaves no folder that looks finished. An item whose results are complete is skipped
    (``skip_existing``, counted as done), an error without it, and redone with ``overwrite``. ``events``
    hears of every item and page in input order and of every token; its ``text`` gets the client text of
    the earliest unfinished page as generated (a PDF's pages with the official separator, so the deltas
    add up to :func:`render`'s Markdown); a later page's text follows as soon as it is the earliest.
    """
    from .engine import BatchEngine

    run = _Run(model, options, out, overwrite, skip_existing, pages, events or _NoEvents())
    engine = BatchEngine(model, batch_size)
    queued = iter(enumerate(items, 1))
    while True:
        while len(engine) < batch_size:
            progressed = run.submit_next(engine, queued)
            yield from run.retire(searchable_pdf)  # an item with nothing left to submit may be complete now
            if not progressed:
                break
        if not run.order:
            return
        for page, response in engine.step() if len(engine) else []:
            run.deliver(engine, page, response)
        yield from run.retire(searchable_pdf)


@dataclass
class _Entry:
    """One page of an item in flight: its engine page, the text held while an earlier page runs."""

    position: int
    index: int | None
    page: Any = None
    held: list[tuple[str, str]] = field(default_factory=list)
    shown: bool = False
    result: OCRResult | None = None
    done: bool = False


@dataclass
class _Flight:
    """One item in flight: its outcome, its pages (rendered lazily, submitted in turn) and whether it failed."""

    outcome: ItemOutcome
    start: float
    sources: Iterator = field(default_factory=lambda: iter(()))
    entries: list[_Entry] = field(default_factory=list)
    exhausted: bool = False
    failed: bool = False
    announced: bool = False

    def current(self) -> _Entry | None:
        """The earliest page not reported yet."""
        return next((e for e in self.entries if not e.done), None)

    def fail(self, e: BaseException, engine: Any) -> None:
        expected = isinstance(e, (ValueError, OSError))
        self.outcome.error = str(e) if expected else f"{type(e).__name__}: {e}"
        self.outcome.exception, self.failed, self.exhausted = e, True, True
        self.outcome.results.clear()
        for entry in self.entries:
            if engine is not None and entry.page is not None and not entry.done:
                engine.cancel(entry.page)


class _Run:
    """The items of :func:`run_items` in flight, in input order: the head item's earliest unfinished page
    streams its text; later pages' text is held until they are the earliest."""

    def __init__(self, model, options, out, overwrite, skip_existing, pages, events):
        self.model, self.options, self.out, self.pages, self.events = model, options, out, pages, events
        self.overwrite, self.skip_existing = overwrite, skip_existing
        self.used: set[Path] = set()
        self.order: deque[_Flight] = deque()
        self.pages_of: dict[int, tuple[_Flight, _Entry]] = {}

    def submit_next(self, engine: Any, queued: Iterator) -> bool:
        """Submit the next page, starting the next item when the last one has no page left; False at the end."""
        if not self.order or self.order[-1].exhausted:
            nxt = next(queued, None)
            if nxt is None:
                return False
            self.order.append(self._start(*nxt))
            return True
        flight = self.order[-1]
        try:
            index, image = next(flight.sources)
        except StopIteration:
            flight.exhausted = True
            return True
        except Exception as e:  # noqa: BLE001 - a PDF that fails to render fails its item
            flight.fail(e, engine)
            return True
        entry = _Entry(len(flight.entries) + 1, index)
        flight.entries.append(entry)
        try:
            entry.page = engine.submit(image, options=self.options, page=index, source=str(flight.outcome.item.path))
        except Exception as e:  # noqa: BLE001 - an unreadable image fails its item
            flight.fail(e, engine)
            return True
        self.pages_of[id(entry.page)] = (flight, entry)
        return True

    def _start(self, index: int, item: Item) -> _Flight:
        outcome = ItemOutcome(item, index=index)
        flight = _Flight(outcome, time.perf_counter())
        try:
            if item.error:
                outcome.error = item.error
            elif self.out is not None:
                outcome.folder = output_folder(self.out, item, self.used)
                _check_existing(outcome, self.overwrite, self.skip_existing)
        except Exception as e:  # noqa: BLE001 - one bad input is one line; the batch goes on
            flight.fail(e, None)
        if outcome.error is None and not outcome.skipped:
            flight.sources = (
                iter(pdf.render_pages(item.path, self.pages, self.options.dpi))
                if item.is_pdf
                else iter([(None, item.path)])
            )
        else:
            flight.exhausted = True
        return flight

    def deliver(self, engine: Any, page: Any, response: Any) -> None:
        """One response of the engine, to its page: shown if it is the earliest unfinished page, else held."""
        flight, entry = self.pages_of.get(id(page), (None, None))
        if flight is None or flight.failed:
            return
        if isinstance(response, Exception):
            del self.pages_of[id(page)]
            flight.fail(response, engine)
            return
        if response.restart:
            (self.events.restart() if entry.shown else entry.held.append(("restart", "")))
            return
        self.events.token(response)
        (self.events.text(response.output) if entry.shown else entry.held.append(("text", response.output)))
        if response.result is not None:  # the page (its pixels and image embeddings) is let go now
            entry.result, entry.page = response.result, None
            del self.pages_of[id(page)]

    def retire(self, searchable_pdf: bool) -> Iterator[ItemOutcome]:
        """Report what is finished at the head, in input order: item starts, pages, whole items (saved)."""
        while self.order:
            flight = self.order[0]
            if not flight.announced:
                flight.announced = True
                self.events.item_start(flight.outcome.index, flight.outcome.item)
            while not flight.failed and (entry := flight.current()) is not None:
                if not entry.shown:  # the earliest page now: its held text goes out, the rest streams
                    entry.shown = True
                    self.events.page_start(entry.position, flight.outcome.item.pages, entry.index)
                    for kind, text in entry.held:
                        (self.events.restart() if kind == "restart" else self.events.text(text))
                    entry.held.clear()
                if entry.result is None:
                    return
                entry.done = True
                flight.outcome.results.append(entry.result)
                if entry.result.page is not None:
                    self.events.text(f"\n{pdf.PAGE_SEPARATOR}\n")  # as join_pages ends each page
                self.events.page_done(entry.result)
            if not (flight.failed or flight.exhausted):
                return  # its next page is still to come
            self.order.popleft()
            for entry in flight.entries:  # a failed item's cancelled pages
                if entry.page is not None:
                    self.pages_of.pop(id(entry.page), None)
            yield self._finish(flight, searchable_pdf)

    def _finish(self, flight: _Flight, searchable_pdf: bool) -> ItemOutcome:
        outcome = flight.outcome
        try:
            if not flight.failed and outcome.error is None and not outcome.skipped and outcome.folder is not None:
                _save(outcome, searchable_pdf)
        except Exception as e:  # noqa: BLE001 - one bad input is one line; the batch goes on
            flight.fail(e, None)
        outcome.seconds = time.perf_counter() - flight.start
        self.events.item_done(outcome)
        return outcome


def _check_existing(outcome: ItemOutcome, overwrite: bool, skip_existing: bool) -> None:
    state, foreign = result_state(outcome.folder, outcome.item)
    if state == "foreign":
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        outcome.error = (
            f"{outcome.folder} holds files dsocr did not write ({shown}); move them away or choose another --out"
        )
    elif state == "done" and not overwrite:
        if skip_existing:
            outcome.skipped = True
        else:
            outcome.error = f"results exist in {outcome.folder}; pass --overwrite to redo them or --skip-existing"


def _folder_mode() -> int:
    """The mode a new folder gets under the process umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o777 & ~mask


def _save(outcome: ItemOutcome, searchable_pdf: bool) -> None:
    # The whole folder is written aside and renamed into place when complete; a folder holding only an
    # older, partial result of this input is replaced then (nothing else ever is: see result_state).
    item = outcome.item
    with staged_folder(outcome.folder, overwrite=True) as staged:
        os.chmod(staged, _folder_mode())  # a hidden staging folder is private; the result is not
        if item.is_pdf:
            save_pdf_results(outcome.results, staged, item.path.stem, overwrite=True)
        else:
            outcome.results[0].save(staged, overwrite=True)
        if searchable_pdf:
            pdf.save_searchable_pdf(outcome.results, staged / searchable_name(item))


@dataclass
class Summary:
    """The counts of a batch, for its closing line."""

    inputs: int
    done: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    pages: int = 0
    truncated: int = 0
    looped: int = 0

    def add(self, outcome: ItemOutcome) -> None:
        if outcome.error:
            self.failed.append(outcome.item.name)
        elif outcome.skipped:
            self.skipped += 1
        else:
            self.done += 1
        self.pages += len(outcome.results)
        self.truncated += len(outcome.truncated)
        self.looped += len(outcome.looped)

    def text(self, seconds: float, out: Path | None = None) -> str:
        """``2 of 3 inputs done in 12.4 s: 4 pages, 1 truncated at the token limit, ...; results in out``."""
        from .progress import duration

        finished = self.done + self.skipped
        noun = "input" if self.inputs == 1 else "inputs"
        pages = "page" if self.pages == 1 else "pages"
        line = (
            f"{finished} of {self.inputs} {noun} done in {duration(seconds)}: {self.pages} {pages}, "
            f"{self.truncated} truncated at the token limit, {self.looped} stopped by repetition"
        )
        if self.skipped:
            line += f", {self.skipped} skipped (done before)"
        if out is not None:
            line += f"; results in {out}"
        if self.failed:
            line += f"; failed: {', '.join(self.failed)}"
        return line


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
