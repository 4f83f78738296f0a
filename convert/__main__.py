"""``python -m dsocr_convert SRC DST``: the same command as ``dsocr convert``."""

from __future__ import annotations

import typer

from .command import convert

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(convert)

if __name__ == "__main__":
    app(prog_name="python -m dsocr_convert")
