"""Grounding spans: the strict box parser against the official extraction, adversarial inputs that must never
raise or run code, the official Markdown clean-up, box drawing and figure crops."""

from __future__ import annotations

import ast
import json
import re
import signal
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from dsocr_mlx.grounding import (
    Block,
    clean_markdown,
    contrast_ratio,
    draw_blocks,
    label_colours,
    label_font_size,
    layout_labels,
    parse_blocks,
    parse_boxes,
    save_figures,
    to_pixels,
)

# --------------------------------------------------------------------------------------------------------------
# The official code, transcribed (run_dpsk_ocr_image.py / run_dpsk_ocr_pdf.py), for well-formed input only
# --------------------------------------------------------------------------------------------------------------

OFFICIAL_PATTERN = r"(<\|ref\|>(.*?)<\|/ref\|><\|det\|>(.*?)<\|/det\|>)"


def official_boxes(raw: str, width: int, height: int) -> list[tuple[str, tuple[int, int, int, int]]]:
    out = []
    for ref in re.findall(OFFICIAL_PATTERN, raw, re.DOTALL):
        label, points_list = ref[1], ast.literal_eval(ref[2])  # the image script's parser
        for x1, y1, x2, y2 in points_list:
            out.append(
                (label, (int(x1 / 999 * width), int(y1 / 999 * height), int(x2 / 999 * width), int(y2 / 999 * height)))
            )
    return out


def official_clean(raw: str, image_prefix: str = "") -> str:
    matches = re.findall(OFFICIAL_PATTERN, raw, re.DOTALL)
    images = [m[0] for m in matches if "<|ref|>image<|/ref|>" in m[0]]
    others = [m[0] for m in matches if "<|ref|>image<|/ref|>" not in m[0]]
    for idx, span in enumerate(images):
        raw = raw.replace(span, "![](images/" + image_prefix + str(idx) + ".jpg)\n")
    for span in others:
        raw = raw.replace(span, "").replace("\\coloneqq", ":=").replace("\\eqqcolon", "=:")
    return raw


def span(label: str, det: str) -> str:
    return f"<|ref|>{label}<|/ref|><|det|>{det}<|/det|>"


@contextmanager
def no_code_execution():
    def refuse(*args, **kwargs):
        raise AssertionError("code was evaluated")

    with (
        mock.patch("builtins.eval", refuse),
        mock.patch("builtins.exec", refuse),
        mock.patch("builtins.compile", refuse),
        mock.patch("ast.literal_eval", refuse),
    ):
        yield


# --------------------------------------------------------------------------------------------------------------
# parse_boxes / parse_blocks on valid spans
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[1, 2, 3, 4]]", [(1, 2, 3, 4)]),
        ("[[1,2,3,4],[5,6,7,8]]", [(1, 2, 3, 4), (5, 6, 7, 8)]),
        ("  [ [ 10 , 20 , 30 , 40 ] ,\n [50,60,70,80] ]  ", [(10, 20, 30, 40), (50, 60, 70, 80)]),
        ("[[12.5, 0.25, 999, 998.75]]", [(12.5, 0.25, 999, 998.75)]),
        ("[[-3, 0, 1000, 5]]", [(-3, 0, 1000, 5)]),
        ("[[1, 2, 3, 4],]", [(1, 2, 3, 4)]),  # literal_eval accepts the trailing comma too
    ],
)
def test_parse_boxes_valid(text, expected):
    boxes = parse_boxes(text)
    assert boxes == [tuple(float(v) for v in b) for b in expected]
    assert boxes == [tuple(float(v) for v in b) for b in ast.literal_eval(text)]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        "[[]]",
        "[[1, 2, 3]]",
        "[[1, 2, 3, 4, 5]]",
        "[1, 2, 3, 4]",
        "[[[1, 2, 3, 4]]]",
        "[[1, 2, 3, 4]",
        "[[1, 2, 3, 4]] extra",
        "[[1, 2, 3, 4] [5, 6, 7, 8]]",
        "[[a, b, c, d]]",
        "[[1, 2, 3, None]]",
        "[[1e5, 2, 3, 4]]",
        "[[0x10, 1, 2, 3]]",
        "[[True, 1, 2, 3]]",
        "[(1, 2, 3, 4)]",
        "[[1, 2, 3, 4]];[1]",
        "[[1,,2,3,4]]",
        "__import__('os').system('true')",
        "[[1, 2, 3, 4]] + [[eval('1'), 0, 0, 0]]",
        "[[lambda: 0, 1, 2, 3]]",
        "[" + "[1, 2, 3, 4]," * 300 + "]",  # more boxes than a real layout block
    ],
)
def test_parse_boxes_rejects(text):
    with no_code_execution():
        assert parse_boxes(text) is None


def test_parse_blocks_maps_pixels_and_text():
    raw = (
        "Header line\n"
        + span("title", "[[10, 20, 500, 100]]")
        + "\n# Quarterly report\n\n"
        + span("image", "[[100, 200, 600, 800], [0, 0, 999, 999]]")
        + "\n"
        + span("text", "[[50.5, 850, 950, 990.9]]")
        + "\nRevenue grew by 12 %.  \n"
    )
    width, height = 1237, 1754
    blocks = parse_blocks(raw, width, height, page=3)
    assert [(b.label, b.box_px) for b in blocks] == official_boxes(raw, width, height)
    assert [b.label for b in blocks] == ["title", "image", "image", "text"]
    assert blocks[0].box_px == (
        int(10 / 999 * width),
        int(20 / 999 * height),
        int(500 / 999 * width),
        int(100 / 999 * height),
    )
    assert blocks[2].box_px == (0, 0, width, height)
    assert blocks[3].box == (50.5, 850.0, 950.0, 990.9)
    assert [b.text for b in blocks] == ["# Quarterly report", "", "", "Revenue grew by 12 %."]
    assert all(b.page == 3 for b in blocks)
    assert json.loads(json.dumps(blocks[0].to_dict()))["box_px"] == list(blocks[0].box_px)


def test_to_pixels_is_official_int_truncation():
    for v in [0, 1, 2, 499, 500, 998, 999, 333.3, 666.6]:
        for size in [1, 7, 640, 1024, 1237]:
            assert to_pixels((v, v, v, v), size, size) == (int(v / 999 * size),) * 4


COORD = st.one_of(st.integers(0, 999), st.floats(0, 999, allow_nan=False).map(lambda f: round(f, 2)))
SPACE = st.sampled_from(["", " ", "  ", "\n"])
LEAD = st.sampled_from(["", " "])  # literal_eval refuses an indented line, so no newline before the list
LABEL = st.sampled_from(["title", "text", "image", "table", "sub_title", "image_caption", "中文 label"])
PLAIN = st.text(alphabet=st.characters(exclude_characters="<", exclude_categories=("Cs",)), max_size=30)


@st.composite
def box_text(draw) -> str:
    values = [draw(SPACE) + repr(draw(COORD)) + draw(SPACE) for _ in range(4)]
    return draw(SPACE) + "[" + ",".join(values) + "]" + draw(SPACE)


@st.composite
def valid_document(draw) -> str:
    parts = [draw(PLAIN)]
    for _ in range(draw(st.integers(0, 4))):
        boxes = draw(st.lists(box_text(), min_size=1, max_size=3))
        parts.append(span(draw(LABEL), draw(LEAD) + "[" + ",".join(boxes) + "]" + draw(SPACE)))
        parts.append(draw(PLAIN))
    return "".join(parts)


@settings(max_examples=150, deadline=None)
@given(raw=valid_document(), width=st.integers(1, 5000), height=st.integers(1, 5000))
def test_parse_blocks_matches_official_on_valid_spans(raw, width, height):
    blocks = parse_blocks(raw, width, height)
    assert [(b.label, b.box_px) for b in blocks] == official_boxes(raw, width, height)
    matches = list(re.finditer(OFFICIAL_PATTERN, raw, re.DOTALL))
    expected_text = [
        raw[m.end() : (matches[i + 1].start() if i + 1 < len(matches) else len(raw))].strip()
        for i, m in enumerate(matches)
        for _ in ast.literal_eval(m.group(3))
    ]
    assert [b.text for b in blocks] == expected_text


# --------------------------------------------------------------------------------------------------------------
# Adversarial input: never raises, never evaluates code, malformed spans give no block
# --------------------------------------------------------------------------------------------------------------

FRAGMENTS = [
    "<|ref|>",
    "<|/ref|>",
    "<|det|>",
    "<|/det|>",
    "<|ref|>image<|/ref|>",
    "<|ref|>text<|/ref|><|det|>",
    "[[",
    "]]",
    "[",
    "]",
    ",",
    " ",
    "\n",
    "1",
    "999",
    "-3",
    "12.5",
    "9" * 7,
    "1e309",
    "text",
    "image",
    "__import__('os').system('echo pwned')",
    "eval('1+1')",
    "exec('x=1')",
    "lambda: 0",
    "(1, 2, 3, 4)",
    "{'a': 1}",
    "None",
    "\\coloneqq",
    "\\eqqcolon",
    "é",
    "🎉",
    "中文",
    "\x00",
    "١٢",
    "[[1, 2, 3, 4]]",
    "[[1, 2, 3, 4], [5, 6, 7, 8]]",
    "<|/det|>[[",
    "]]<|/det|>",
]
# At most 40 fragments of at most 7 digits: numbers stay below 1e308 (see test_overflowing_number_gives_no_block).
ADVERSARIAL = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(raw=ADVERSARIAL, width=st.integers(1, 4000), height=st.integers(1, 4000))
@example(raw=span("image", "__import__('os').system('echo pwned')"), width=10, height=10)
@example(raw=span("text", "[[1, 2, 3, 4]] + [[eval('1'), 0, 0, 0]]"), width=10, height=10)
@example(raw=span("x", "[[" + "9" * 300 + ", 0, 1, 1]]"), width=10, height=10)
# A figure by the official rule: its span holds "<|ref|>image<|/ref|>", here before a nested span's label.
@example(raw="<|ref|>image<|/ref|><|ref|>text<|/ref|><|det|><|/det|>[[", width=1, height=1)
def test_adversarial_never_raises_or_evaluates(raw, width, height):
    with no_code_execution():
        blocks = parse_blocks(raw, width, height)
        cleaned = clean_markdown(raw)
        clean_markdown(raw, image_prefix="7_")
    assert all(isinstance(b, Block) and len(b.box) == 4 for b in blocks)
    assert all(all(isinstance(v, int) for v in b.box_px) for b in blocks)
    assert cleaned == official_clean(raw)  # clean_markdown is independent of box validity, as upstream
    assert len(blocks) <= len(re.findall(OFFICIAL_PATTERN, raw, re.DOTALL)) * 256


@st.composite
def long_document(draw) -> str:
    """Up to ~100k characters: a chunk with closed spans (valid or not) repeated, plus a truncated tail."""
    chunk = draw(valid_document()) + span(draw(LABEL), draw(st.sampled_from(FRAGMENTS))) + draw(PLAIN)
    chunk = chunk or "x"
    repeats = draw(st.integers(1, 100_000 // len(chunk)))
    tail = draw(valid_document())
    return chunk * repeats + tail[: draw(st.integers(0, len(tail)))]


@settings(max_examples=15, deadline=None)
@given(raw=long_document())
@example(
    raw=(
        span("image", "[[1, 2, 3, 4]]") + "caption text " * 10 + span("text", "[[5, 6, 7, 8]]") + "\\coloneqq é 🎉 " * 5
    )
    * 600
    + "<|ref|>image<|/ref|><|det|>[[1, 2"
)
def test_long_inputs_never_raise(raw):
    assert len(raw) <= 200_000
    with no_code_execution():
        blocks = parse_blocks(raw, 1000, 1000)
        cleaned = clean_markdown(raw)
    assert len(blocks) == len(official_boxes_safe(raw))
    assert cleaned == official_clean(raw)


def official_boxes_safe(raw: str) -> list:
    """Spans whose boxes the official parser accepts and which are lists of 4-number lists."""
    ok = []
    for ref in re.findall(OFFICIAL_PATTERN, raw, re.DOTALL):
        try:
            value = ast.literal_eval(ref[2])
        except Exception:  # noqa: BLE001 - anything the official parser would skip
            continue
        if (
            isinstance(value, list)
            and value
            and len(value) <= 256
            and all(isinstance(b, list) and len(b) == 4 and all(type(v) in (int, float) for v in b) for b in value)
        ):
            ok.extend(value)
    return ok


def test_payload_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        f"__import__('pathlib').Path({str(marker)!r}).touch()",
        f"[[open({str(marker)!r}, 'w').close(), 0, 0, 0]]",
        f"[[1, 2, 3, 4]] if __import__('pathlib').Path({str(marker)!r}).touch() else []",
    ]
    for payload in payloads:
        raw = span("image", payload) + "after"
        with no_code_execution():
            assert parse_blocks(raw, 100, 100) == []
            assert clean_markdown(raw) == "![](images/0.jpg)\nafter"
    assert not marker.exists()


MALFORMED = [
    "[[1, 2, 3]]",
    "[[1, 2, 3, 4, 5]]",
    "[[[1, 2, 3, 4]]]",
    "[[1, [2], 3, 4]]",
    "[[1, 2, 3, 4]",
    "[1, 2, 3, 4]",
    "[[a, b, c, d]]",
    "[[1, 2, 3, 4]] [[5, 6, 7, 8]]",
    "",
    "[]",
    "[[1 2 3 4]]",
    "[[1, 2, 3, 4]] and __import__('os')",
    "[[1e3, 1, 2, 3]]",
    "[[nan, 1, 2, 3]]",
    "[[inf, 0, 1, 1]]",
]


@settings(max_examples=100, deadline=None)
@given(
    det=st.one_of(
        st.sampled_from(MALFORMED),
        st.tuples(st.sampled_from(["[[1, 2, 3, 4], [5, 6, 7, 8]]", "[[10.5, 20, 30, 40]]"]), st.integers(0, 27)).map(
            lambda t: t[0][: min(t[1], len(t[0]) - 1)]
        ),
    ),
    label=LABEL,
    tail=PLAIN,
)
def test_malformed_span_gives_no_block(det, label, tail):
    raw = span(label, det) + tail
    with no_code_execution():
        assert parse_blocks(raw, 640, 480) == []
    expected = "![](images/0.jpg)\n" + tail if label == "image" else tail
    assert clean_markdown(raw) == expected  # the span text is removed whatever its boxes, as upstream


@settings(max_examples=100, deadline=None)
@given(raw=valid_document().filter(lambda r: "<|ref|>" in r), cut=st.integers(0, 10_000))
def test_truncated_spans(raw, cut):
    last = raw.rfind("<|ref|>")
    end = raw.find("<|/det|>", last) + len("<|/det|>")
    cut = last + cut % (end - last)  # somewhere inside the last span
    truncated = raw[:cut]
    blocks = parse_blocks(truncated, 100, 100)
    assert len(blocks) == len(official_boxes(raw[:last], 100, 100))
    assert clean_markdown(truncated).endswith(raw[last:cut])  # the unfinished span stays as text


def test_overflowing_number_gives_no_block():
    raw = span("text", "[[" + "9" * 400 + ", 0, 10, 10]]") + "tail"
    assert parse_blocks(raw, 100, 100) == []


def test_draw_blocks_survives_huge_coordinates():
    image = Image.new("RGB", (100, 80), "white")
    blocks = parse_blocks(span("text", "[[0, 0, 99999999999999999999, 10]]"), 100, 80)
    assert len(blocks) == 1
    assert draw_blocks(image, blocks).size == image.size


def test_non_ascii_digits_are_rejected():
    assert parse_boxes("[[١, ٢, ٣, ٤]]") is None and parse_boxes("[[１, 2, 3, 4]]") is None


@contextmanager
def time_limit(seconds: float):
    def stop(*args):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs POSIX timers")
def test_unterminated_spans_parse_in_linear_time():
    with time_limit(1.5):
        for raw in ["<|ref|>a<|/ref|><|det|>" * 1000, "<|ref|>" * 14_000]:
            assert parse_blocks(raw, 100, 100) == []
            assert clean_markdown(raw) == raw


# --------------------------------------------------------------------------------------------------------------
# clean_markdown: the official post-processing
# --------------------------------------------------------------------------------------------------------------


def test_clean_markdown_official_example():
    raw = (
        span("title", "[[1, 2, 3, 4]]")
        + "\n# Title\n"
        + span("image", "[[10, 10, 500, 500]]")
        + "\n"
        + span("text", "[[1, 600, 999, 700]]")
        + "\nLet $a \\coloneqq b$ and $c \\eqqcolon d$.\n"
        + span("image", "[[10, 800, 500, 990]]")
        + "\n"
        + span("image_caption", "[[1, 2, 3, 4]]")
        + "\nFigure 2."
    )
    expected = "\n# Title\n![](images/0.jpg)\n\n\nLet $a := b$ and $c =: d$.\n![](images/1.jpg)\n\n\nFigure 2."
    assert clean_markdown(raw) == expected == official_clean(raw)
    assert clean_markdown(raw, image_prefix="3_") == expected.replace("images/", "images/3_")


def test_clean_markdown_colon_rewrites_only_with_other_spans():
    # Upstream rewrites \coloneqq inside the loop over non-figure spans: no such span, no rewrite.
    text = "$a \\coloneqq b$"
    assert clean_markdown(text) == text
    assert clean_markdown(span("image", "[[1, 2, 3, 4]]") + text) == "![](images/0.jpg)\n" + text
    assert clean_markdown(span("text", "[[1, 2, 3, 4]]") + text) == "$a := b$"


def test_clean_markdown_removes_malformed_and_repeated_spans():
    bad = span("text", "[[oops")
    assert clean_markdown("a" + bad + "b" + bad + "c") == "abc"
    figure = span("image", "[[1, 2, 3, 4]]")
    assert clean_markdown(figure + "x" + figure) == official_clean(figure + "x" + figure)
    assert clean_markdown("no spans at all <|ref|>dangling") == "no spans at all <|ref|>dangling"


@settings(max_examples=150, deadline=None)
@given(raw=st.one_of(valid_document(), ADVERSARIAL), prefix=st.sampled_from(["", "0_", "12_"]))
def test_clean_markdown_matches_official(raw, prefix):
    assert clean_markdown(raw, image_prefix=prefix) == official_clean(raw, prefix)


# --------------------------------------------------------------------------------------------------------------
# draw_blocks and save_figures
# --------------------------------------------------------------------------------------------------------------


def _page(size=(300, 200)) -> Image.Image:
    image = Image.new("RGB", size, (250, 250, 250))
    image.paste((200, 30, 30), (30, 40, 130, 140))  # a red "figure"
    image.paste((30, 30, 200), (200, 20, 280, 60))  # a blue one
    return image


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_draw_blocks_draws_inside_boxes_only(mode):
    image = _page().convert(mode)
    before = image.copy()
    blocks = parse_blocks(span("title", "[[333, 500, 666, 800]]") + "x", image.width, image.height)
    drawn = draw_blocks(image, blocks)
    assert drawn.mode == "RGB" and drawn.size == image.size
    assert np.array_equal(np.asarray(image), np.asarray(before))  # the input is left alone
    diff = np.abs(np.asarray(drawn, np.int16) - np.asarray(image.convert("RGB"), np.int16)).sum(-1)
    x1, y1, x2, y2 = blocks[0].box_px
    assert diff[y1 : y2 + 1, x1 : x2 + 1].sum() > 0
    outside = diff.copy()
    outside[y1 : y2 + 1, x1 : x2 + 1] = 0  # the box
    ((_, label),) = layout_labels(image.size, blocks)
    lx1, ly1, lx2, ly2 = label.rect
    assert (lx1, ly2) == (x1, y1)  # the label sits on the box's top-left corner
    outside[ly1:ly2, lx1:lx2] = 0
    assert outside.sum() == 0


def test_draw_blocks_without_blocks_or_with_degenerate_box_is_unchanged():
    image = _page()
    assert np.array_equal(np.asarray(draw_blocks(image, [])), np.asarray(image))
    degenerate = parse_blocks(span("text", "[[600, 600, 100, 100]]"), image.width, image.height)
    assert np.array_equal(np.asarray(draw_blocks(image, degenerate)), np.asarray(image))


def test_save_figures_crops_image_blocks(tmp_path):
    image = _page()
    w, h = image.size
    box_red = [round(v * 999) for v in (30 / w, 40 / h, 130 / w, 140 / h)]
    raw = (
        span("image", f"[{box_red}]")
        + "figure one"
        + span("text", "[[0, 0, 999, 999]]")
        + "words"
        + span("image", "[[400, 500, 400, 700], [660, 100, 2000, 300]]")  # zero width, then too wide
        + span("image", "[[999, 999, 999, 999]]")
    )  # zero area at the corner
    blocks = parse_blocks(raw, w, h)
    paths = save_figures(image, blocks, tmp_path / "images", prefix="2_")
    assert [p.name for p in paths] == ["2_0.jpg", "2_2.jpg"]  # numbering follows the figures, as upstream
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["2_0.jpg", "2_2.jpg"]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
    with Image.open(paths[0]) as crop:
        x1, y1, x2, y2 = blocks[0].box_px
        assert crop.size == (x2 - x1, y2 - y1)
        mean = np.asarray(crop, np.float64).reshape(-1, 3).mean(0)
        assert mean[0] > 150 and mean[2] < 100  # red
    with Image.open(paths[1]) as crop:
        x1, y1, x2, y2 = blocks[3].box_px
        assert x2 > w and crop.size == (w - x1, y2 - y1)  # clamped to the image
    assert save_figures(image, [b for b in blocks if b.label != "image"], tmp_path / "none") == []


def test_save_figures_skips_boxes_outside_the_image(tmp_path):
    image = _page()
    raw = span("image", "[[1200, 100, 1500, 300]]") + span("image", "[[-500, 100, -100, 300]]")
    assert save_figures(image, parse_blocks(raw, image.width, image.height), tmp_path) == []


def test_save_figures_skips_reversed_boxes(tmp_path):
    image = _page()
    blocks = parse_blocks(span("image", "[[600, 600, 100, 100]]"), image.width, image.height)
    assert save_figures(image, blocks, tmp_path) == []


# --------------------------------------------------------------------------------------------------------------
# Readable labels on the boxes picture
# --------------------------------------------------------------------------------------------------------------


def overlapping(rects) -> list:
    return [
        (a, b)
        for i, a in enumerate(rects)
        for b in rects[i + 1 :]
        if min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])
    ]


def page_layout(rows: int, columns: int = 1, gap: int = 4) -> str:
    """Boxes stacked like a page's lines (``gap`` thousandths apart), in columns."""
    raw, height = "", 900 // rows
    for c in range(columns):
        left, right = 40 + c * 920 // columns, 40 + (c + 1) * 920 // columns - 20
        for r in range(rows):
            top = 50 + r * height
            label = ("title", "text", "table", "image_caption", "equation")[(r + c) % 5]
            raw += span(label, f"[[{left}, {top}, {right}, {top + height - gap}]]") + f"row {r}\n"
    return raw


@pytest.mark.parametrize(
    ("size", "rows", "columns", "gap"),
    [((1224, 1584), 40, 1, 4), ((1224, 1584), 30, 2, 1), ((640, 480), 12, 3, 0), ((900, 700), 8, 1, 40)],
)
def test_label_rectangles_never_overlap(size, rows, columns, gap):
    blocks = parse_blocks(page_layout(rows, columns, gap) + span("image", "[[0, 0, 999, 60]]"), *size)
    labels = [label for _, label in layout_labels(size, blocks)]
    assert len(labels) == len(blocks)
    rects = [label.rect for label in labels]
    assert overlapping(rects) == []
    assert all(0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1] for x1, y1, x2, y2 in rects)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 999), st.integers(0, 999), st.integers(1, 400), st.integers(1, 200)),
        min_size=1,
        max_size=25,
    )
)
def test_label_rectangles_never_overlap_on_random_layouts(boxes):
    raw = "".join(
        span(("text", "title", "table")[i % 3], f"[[{x}, {y}, {min(x + w, 999)}, {min(y + h, 999)}]]")
        for i, (x, y, w, h) in enumerate(boxes)
    )
    blocks = parse_blocks(raw, 1224, 1584)
    assert overlapping([label.rect for _, label in layout_labels((1224, 1584), blocks)]) == []


def test_labels_avoid_the_next_box_and_sit_inside_at_the_top_edge():
    size = (1000, 1000)
    raw = span("title", "[[100, 0, 900, 80]]") + span("text", "[[100, 85, 900, 300]]")
    raw += span("table", "[[100, 400, 900, 600]]")
    placed = {block.label: (block.box_px, label.rect) for block, label in layout_labels(size, parse_blocks(raw, *size))}
    box, rect = placed["title"]
    assert rect[1] == box[1] and rect[0] == box[0]  # no room above: inside, at the top-left corner
    box, rect = placed["text"]
    assert rect[1] == box[1]  # the title box is just above: inside rather than over it
    box, rect = placed["table"]
    assert rect[3] == box[1] and rect[0] == box[0]  # room above: on the box's top-left corner


def test_label_type_grows_with_the_picture():
    sizes = [(320, 240), (900, 700), (1224, 1584), (2550, 3300)]
    font_sizes = [label_font_size(s) for s in sizes]
    assert font_sizes[0] >= 12 and font_sizes == sorted(font_sizes) and font_sizes[-1] >= 3 * font_sizes[1]
    heights = []
    for size in sizes:
        blocks = parse_blocks(span("text", "[[100, 300, 900, 600]]"), *size)
        ((_, label),) = layout_labels(size, blocks)
        heights.append(label.rect[3] - label.rect[1])
    assert heights == sorted(heights) and heights[-1] > 2.5 * heights[1]


def test_label_colours_are_distinct_and_readable():
    kinds = ["text", "title", "image", "table", "image_caption", "table_caption", "sub_title", "equation", "a", "b"]
    colours = label_colours(kinds)
    assert len(set(colours.values())) == len(kinds)
    assert label_colours(["title"])["title"] == colours["title"]  # a kind keeps its colour on every page
    raw = "".join(span(k, f"[[{10 + 90 * i}, 300, {90 + 90 * i}, 600]]") for i, k in enumerate(kinds))
    image = Image.new("RGB", (1200, 900), "white")
    blocks = parse_blocks(raw, *image.size)
    drawn = np.asarray(draw_blocks(image, blocks))
    for _, label in layout_labels(image.size, blocks):
        assert contrast_ratio(label.ink, label.colour) >= 4.5
        x1, y1, x2, y2 = label.rect
        pixels = {tuple(p) for p in drawn[y1:y2, x1:x2].reshape(-1, 3)}
        assert label.colour in pixels and label.ink in pixels  # the tag and its text
    assert contrast_ratio((0, 0, 0), (255, 255, 255)) == pytest.approx(21)


def test_long_labels_are_cut():
    text = "an OCR-task label is the line's own text, which can be long"
    ((_, label),) = layout_labels((800, 600), parse_blocks(span(text, "[[100, 300, 900, 600]]"), 800, 600))
    assert label.text.endswith("…") and len(label.text) == 30 and text.startswith(label.text[:-1])


def test_block_json_counts_pages_from_one():
    block = parse_blocks(span("text", "[[0, 0, 10, 10]]") + "x", 100, 100, page=2)[0]
    assert block.to_dict()["page"] == 3 and block.to_dict()["page_index"] == 2
