"""The client's text as it is generated: only the part of the final text that can no longer change.

The final text of a page is :func:`final_text` of its raw output, and nothing else; while tokens come,
:class:`TextStream` emits the longest prefix of it that later tokens cannot rewrite. Held back until
known:

- leading and trailing whitespace (the final text is stripped);
- an open grounding span (Markdown drops it or turns it into a figure link), and a span with a nested
  ``<|ref|>`` (the official replace-all of a later span's text would reach into it);
- a possible start of a stop string;
- what the official clean-up rewrites when a non-figure span is removed: ``\\coloneqq`` and
  ``\\eqqcolon`` (once one such span exists) and, on PDF pages, runs of blank lines (collapsed again
  at every such span).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from . import grounding

_SPAN_OPEN = "<|ref|>"
_REWRITTEN = ("\\coloneqq", "\\eqqcolon")  # replaced at every removed non-figure span
_BLANK_RUN = "\n\n\n"  # collapsed at every removed non-figure span on a PDF page


def markdown(raw: str, page: int | None = None) -> str:
    """The official Markdown of raw model text: figure links named per page, spans removed, and on
    a PDF page (``page`` set) blank lines collapsed as the official PDF script does."""
    return grounding.clean_markdown(raw, f"{page}_" if page is not None else "", pdf_page=page is not None)


def final_text(raw: str, output: str, page: int | None = None, blocks: Sequence[Any] = ()) -> str:
    """What a client gets for a finished page: ``markdown``, the ``raw`` text, or ``json`` (text and blocks)."""
    if output == "raw":
        return raw
    text = markdown(raw, page)
    if output == "json":
        return json.dumps({"text": text, "blocks": [b.to_dict() for b in blocks]}, ensure_ascii=False)
    return text


class TextStream:
    """Client text deltas of one page, fed the raw text so far after each token."""

    def __init__(self, output: str = "markdown", page: int | None = None, stop: Sequence[str] = ()):
        self.output, self.page = output, page
        self.hold = max((len(s) for s in stop), default=1) - 1  # a stop string may still complete here
        self.sent = ""
        self.seen = 0  # the length of the raw text last looked at

    def feed(self, raw: str) -> str:
        """The new final text given the raw text so far (possibly empty)."""
        if self.output == "json":
            return ""  # one object, sent whole at the end
        # The clean-up rewrites the whole text, so a look costs its length: on a long page, look again only
        # once the text has grown by 1/512 (a dozen tokens at 30k characters), about 0.3 ms a token.
        if len(raw) - self.seen < len(raw) >> 9:
            return ""
        self.seen = len(raw)
        text = raw.lstrip()
        text = text[: max(0, len(text) - self.hold)].rstrip()  # held for a stop string, then stripped
        if self.output == "markdown":
            text = self._stable_markdown(text)
        return self._advance(text)

    def finish(self, final: str) -> str:
        """The rest of ``final`` (the page's :func:`final_text`) once generation has ended."""
        return self._advance(final)

    def _stable_markdown(self, text: str) -> str:
        spans = grounding.find_spans(text)
        # A span opened after the last complete one may still complete: everything from it waits.
        opened = text.find(_SPAN_OPEN, spans[-1][1] if spans else 0)
        # A span with a nested opening holds the text of a span that may still come: the official
        # replace-all would rewrite it then.
        nested = [start for start, _, label, _ in spans if _SPAN_OPEN in label]
        cuts = [i for i in [opened, *nested[:1]] if i >= 0]
        if cuts:
            text = text[: min(cuts)]
        for k in range(len(_SPAN_OPEN) - 1, 0, -1):
            if text.endswith(_SPAN_OPEN[:k]):
                text = text[:-k]
                break
        removed_span = any(end <= len(text) and not grounding.is_figure(text[start:end]) for start, end, _, _ in spans)
        text = markdown(text, self.page)
        # Span markup left after the clean-up (a span joined from the text around a removed one, or an
        # unclosed one) may still be removed by the replace-all of a later span: it waits.
        left = text.find(_SPAN_OPEN)
        if left >= 0:
            text = text[:left]
        # Each removed non-figure span rewrites the whole text once more: the first one replaces these,
        # and on a PDF page every one collapses runs of blank lines again (a run of 6 becomes 3, then 2).
        patterns = (() if removed_span else _REWRITTEN) + ((_BLANK_RUN,) if self.page is not None else ())
        cuts = [i for i in (text.find(p) for p in patterns) if i >= 0]
        text = text[: min(cuts, default=len(text))]
        for p in (*_REWRITTEN, _SPAN_OPEN):  # a pattern may be completing at the end
            for k in range(len(p) - 1, 0, -1):
                if text.endswith(p[:k]):
                    text = text[:-k]
                    break
        return text

    def _advance(self, text: str) -> str:
        # Only ever append: a text that no longer extends what was sent waits for the end.
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta
