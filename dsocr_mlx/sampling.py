"""Backend-neutral generation rules: sampling settings, the official n-gram ban, loop detection.

Each rule is written once here on plain token lists; the backends only apply the result to logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

TD_OPEN, TD_CLOSE = 128821, 128822  # <td>, </td>: never banned by the official n-gram rule
NGRAM_WHITELIST = frozenset({TD_OPEN, TD_CLOSE})
# Official settings: run_dpsk_ocr_image.py bans 30-grams in a 90-token window, run_dpsk_ocr_pdf.py 20 in 50.
IMAGE_NGRAM = (30, 90)
PDF_NGRAM = (20, 50)


@dataclass
class SamplingParams:
    """How tokens are chosen. ``temperature=0`` is greedy; the n-gram ban is off when its size is 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = IMAGE_NGRAM[0]
    ngram_window: int = IMAGE_NGRAM[1]
    ngram_whitelist: frozenset[int] = field(default_factory=lambda: NGRAM_WHITELIST)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0 or (self.no_repeat_ngram_size and self.ngram_window < 1):
            raise ValueError(
                f"no_repeat_ngram_size must be >= 0 (0 = off) and ngram_window >= 1, got "
                f"{self.no_repeat_ngram_size} and {self.ngram_window}"
            )

    def stronger(self) -> SamplingParams:
        """The anti-repetition settings of a retry after a loop: a shorter n-gram over a long window."""
        size = min(self.no_repeat_ngram_size or PDF_NGRAM[0], PDF_NGRAM[0])
        return replace(
            self,
            no_repeat_ngram_size=size,
            ngram_window=max(self.ngram_window, 1024),
            repetition_penalty=max(self.repetition_penalty, 1.05),
        )


def banned_ngram_tokens(
    tokens: list[int], ngram_size: int, window: int, whitelist: frozenset[int] = NGRAM_WHITELIST
) -> set[int]:
    """The official ``NoRepeatNGramLogitsProcessor``: tokens that would repeat an n-gram of the window.

    Looks at the n-grams starting in the last ``window`` tokens; any whose first ``n-1`` tokens equal the
    current last ``n-1`` tokens bans its last token, unless whitelisted.
    """
    n = ngram_size
    # n = 1 bans nothing upstream: its prefix slice input_ids[-0:] is the whole list, never a 0-tuple.
    if n <= 1 or len(tokens) < n:
        return set()
    prefix = tokens[len(tokens) - (n - 1) :] if n > 1 else []
    start = max(0, len(tokens) - window)
    end = len(tokens) - n + 1
    banned = set()
    for i in range(start, end):
        if tokens[i : i + n - 1] == prefix:
            banned.add(tokens[i + n - 1])
    return banned - whitelist


@dataclass
class Repetition:
    """A degenerate loop found at the end of the output."""

    period: int  # tokens in the repeated unit
    repeats: float  # how many times it repeats at the end
    start: int  # index in the generated tokens where the loop begins


class LoopDetector:
    """Finds an output that has fallen into repeating itself, as it is generated.

    The tail is a loop when one unit of ``period`` tokens repeats back to back over at least ``min_span``
    tokens and at least ``min_repeats`` times. Units that are table or rule markup only (for example the
    cells of an empty table) do not count, so long legitimate tables never trigger it.
    """

    def __init__(
        self,
        decode=None,
        min_span: int = 240,
        min_repeats: int = 4,
        max_period: int = 512,
        every: int = 8,
        markup_only=None,
    ):
        self.min_span = min_span
        self.min_repeats = min_repeats
        self.max_period = max_period
        self.every = every
        self.decode = decode
        self.markup_only = markup_only or _is_markup_only

    def check(self, tokens: list[int]) -> Repetition | None:
        """Call after every token; looks every ``every`` tokens."""
        n = len(tokens)
        if n < self.min_span or n % self.every:
            return None
        import numpy as np  # here, so that the options (and the CLI) import no numpy

        tail = np.asarray(tokens[-min(n, 4 * self.max_period + self.min_span) :], dtype=np.int64)
        for period in range(1, min(self.max_period, len(tail) // self.min_repeats) + 1):
            same = tail[period:] == tail[:-period]
            if not same[-1]:
                continue
            mismatches = np.flatnonzero(~same)
            run = len(same) - (int(mismatches[-1]) + 1 if len(mismatches) else 0)
            span = run + period
            if span >= self.min_span and span >= self.min_repeats * period:
                unit = tokens[n - period :]
                if self.decode is not None and self.markup_only(self.decode(unit)):
                    continue
                return Repetition(period=period, repeats=span / period, start=n - span)
        return None


_MARKUP = (
    "<td>",
    "</td>",
    "<tr>",
    "</tr>",
    "<table>",
    "</table>",
    "<thead>",
    "</thead>",
    "<tbody>",
    "</tbody>",
    "|",
    "-",
    ":",
    "=",
    "*",
    "_",
    "&nbsp;",
)


def _is_markup_only(text: str) -> bool:
    for piece in _MARKUP:
        text = text.replace(piece, "")
    return not text.strip()
