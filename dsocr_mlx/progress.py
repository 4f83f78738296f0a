"""Terminal output of the shells: rich progress bars on stderr, drawn only on a terminal (quiet in pipes,
logs and CI), and message lines that never interleave with a bar or with text streamed to stdout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from .batch import Item, ItemOutcome
    from .pipeline import GenerationResponse, OCRResult


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (False for pipes, files and closed streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def duration(seconds: float) -> str:
    """``41.2 s``, ``3 min 12 s``, ``1 h 02 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _console(stream: TextIO):
    from rich.console import Console

    # File names and model text are shown as they are: no markup, emoji codes or highlighting, and no
    # line breaks inserted at the terminal width (a copied path must stay whole).
    return Console(file=stream, markup=False, emoji=False, highlight=False, soft_wrap=True)


class Progress:
    """``with Progress(total, "converting") as bar: bar.update(1)``: a rich bar on stderr, drawn only on a
    terminal; ``extra`` is a live note after it."""

    def __init__(self, total: int | None, label: str, stream: TextIO | None = None, enabled: bool | None = None):
        self.total, self.label, self.done = total, label, 0
        stream = stream or sys.stderr
        self.enabled = is_terminal(stream) if enabled is None else enabled
        self._bar = None
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[extra]}", markup=False),
                console=_console(stream),
                redirect_stdout=False,
            )
            self._task = self._bar.add_task(label, total=total, extra="")

    def update(self, n: int = 1, extra: str | None = None) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n, **({} if extra is None else {"extra": extra}))

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


class BatchDisplay:
    """What a run over images and PDFs shows (it implements :class:`dsocr_mlx.batch.BatchEvents`).

    On stderr, when it is a terminal, a live bar: input N/total, the current input and page, pages
    done/total, elapsed time, ETA and tokens/s. With ``stream``, the text of each page on stdout as it
    is generated. :meth:`line` prints a message line on stderr above the bar, after ending a streamed
    line, so bar, text and messages never share a line. The bar is not drawn while text streams to the
    terminal (the text itself shows the progress).
    """

    def __init__(self, total_pages: int, inputs: int, stream: bool = False, bar: bool | None = None):
        self.inputs, self.stream = inputs, stream
        self._mid_line = False  # the last text written to stdout did not end its line
        self._index, self._name, self._expected, self._pages_done = 0, "", 1, 0
        self._page = ""
        if bar is None:
            bar = is_terminal(sys.stderr) and not (stream and is_terminal(sys.stdout))
        self._bar = None
        if bar:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}", markup=False),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("pages", markup=False),
                TimeElapsedColumn(),
                TextColumn("ETA", markup=False),
                TimeRemainingColumn(),
                TextColumn("{task.fields[rate]}", markup=False),
                console=_console(sys.stderr),
                transient=True,  # the summary line takes its place
                redirect_stdout=False,  # stdout carries the results: never rerouted
                redirect_stderr=True,  # stray stderr lines (warnings of libraries) go above the bar
            )
            self._task = self._bar.add_task("", total=total_pages, rate="")

    def __enter__(self) -> BatchDisplay:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_bar()
        self._end_line()

    # -- batch.BatchEvents ------------------------------------------------------------------------------

    def item_start(self, index: int, item: Item) -> None:
        self._index, self._name, self._expected = index, Path(item.name).name, item.pages
        self._pages_done, self._page = 0, ""
        self._describe()

    def page_start(self, position: int, count: int, page: int | None) -> None:
        self._page = "" if page is None else f" page {page + 1} ({position}/{count})"
        self._describe()

    def token(self, response: GenerationResponse) -> None:
        if self._bar is not None:
            rate = f"{response.generation_tokens} tok, {response.generation_tps:.1f} tok/s"
            self._bar.update(self._task, rate=rate)

    def text(self, delta: str) -> None:
        if self.stream and delta:
            sys.stdout.write(delta)
            sys.stdout.flush()
            self._mid_line = not delta.endswith("\n")

    def restart(self) -> None:
        if self.stream:  # the discarded text is on screen: say so
            self.line(f"dsocr: {self._name}: a repetition loop; retrying with stronger anti-repetition settings")
        self._describe(" (retrying)")

    def page_done(self, result: OCRResult) -> None:
        self._pages_done += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=1)

    def item_done(self, outcome: ItemOutcome) -> None:
        # Pages that did not run (skipped, failed) leave the total, so the ETA counts only real work.
        missing = self._expected - self._pages_done
        if self._bar is not None and missing > 0:
            task = self._bar.tasks[0]
            self._bar.update(self._task, total=max((task.total or 0) - missing, task.completed))

    # -- the shell's output -----------------------------------------------------------------------------

    def line(self, message: str) -> None:
        """One line on stderr: above the live bar, or after ending a line of streamed text."""
        if self._bar is not None:
            self._bar.console.print(message)
            return
        if self._mid_line and is_terminal(sys.stdout) and is_terminal(sys.stderr):
            self._end_line()
        sys.stderr.write(message + "\n")
        sys.stderr.flush()

    def output(self, text: str) -> None:
        """A whole result on stdout (the bar is taken down first when both share the terminal)."""
        if is_terminal(sys.stdout):
            self._stop_bar()
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        self._mid_line = False

    def _end_line(self) -> None:
        if self._mid_line:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self._mid_line = False

    def _stop_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _describe(self, note: str = "") -> None:
        if self._bar is not None:
            where = f"{self._index}/{self.inputs} " if self.inputs > 1 else ""
            self._bar.update(self._task, description=f"{where}{self._name}{self._page}{note}")
