"""PDF input and output: page counts, rendering size, page ranges, clear errors for empty, corrupt, missing,
encrypted and huge documents, PDF detection, the layout PDF written from pictures, the searchable PDF, and
page numbers in JSON."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dsocr_mlx import pdf
from dsocr_mlx.grounding import parse_blocks
from dsocr_mlx.pipeline import OCRResult, save_pdf_results

pdfium = pytest.importorskip("pypdfium2")

# --------------------------------------------------------------------------------------------------------------
# PDFs made in the test
# --------------------------------------------------------------------------------------------------------------

COLOURS = [(220, 30, 30), (30, 160, 30), (30, 30, 220), (240, 240, 240), (20, 20, 20), (200, 200, 0), (0, 200, 200)]
PAGE_PT = (150, 100)  # at resolution 72 a pixel is a point


@pytest.fixture(scope="module")
def seven_pages(tmp_path_factory) -> Path:
    """Seven solid-colour pages of 150x100 points, written by Pillow."""
    path = tmp_path_factory.mktemp("pdf") / "seven.pdf"
    images = [Image.new("RGB", PAGE_PT, c) for c in COLOURS]
    images[0].save(path, "PDF", save_all=True, append_images=images[1:], resolution=72.0)
    return path


_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def _rc4(key: bytes, data: bytes) -> bytes:
    s, j = list(range(256)), 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(byte ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


def minimal_pdf(sizes: list[tuple[float, float]], user_password: bytes | None = None) -> bytes:
    """A hand-written PDF with empty pages of the given point sizes; with ``user_password`` it is encrypted
    with the standard security handler (RC4 40-bit, revision 2: PDF 1.7 algorithms 3.2 to 3.4)."""
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [" + " ".join(f"{3 + i} 0 R" for i in range(len(sizes))) + f"] /Count {len(sizes)} >>",
    ]
    objects += [f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {w} {h}] >>" for w, h in sizes]
    file_id = hashlib.md5(b"dsocr-mlx test").digest()
    trailer = f" /ID [<{file_id.hex()}> <{file_id.hex()}>]"
    if user_password is not None:
        padded_user = (user_password + _PAD)[:32]
        owner = _rc4(hashlib.md5((b"owner" + _PAD)[:32]).digest()[:5], padded_user)
        permissions = -4
        key = hashlib.md5(padded_user + owner + (permissions & 0xFFFFFFFF).to_bytes(4, "little") + file_id).digest()[:5]
        user = _rc4(key, _PAD)
        objects.append(f"<< /Filter /Standard /V 1 /R 2 /O <{owner.hex()}> /U <{user.hex()}> /P {permissions} >>")
        trailer += f" /Encrypt {len(objects)} 0 R"
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R{trailer} >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


# --------------------------------------------------------------------------------------------------------------
# Counting and rendering
# --------------------------------------------------------------------------------------------------------------


def test_page_count(seven_pages, tmp_path):
    assert pdf.page_count(seven_pages) == 7
    path = tmp_path / "two.pdf"
    path.write_bytes(minimal_pdf([(200, 100), (300, 50)]))
    assert pdf.page_count(str(path)) == 2


def test_render_at_144_dpi_doubles_points(seven_pages):
    pages = list(pdf.render_pages(seven_pages))
    assert [i for i, _ in pages] == list(range(7))
    for (_, image), colour in zip(pages, COLOURS):
        assert image.mode == "RGB" and image.size == (PAGE_PT[0] * 2, PAGE_PT[1] * 2)
        centre = np.asarray(image)[50:150, 75:225].reshape(-1, 3).mean(0)
        assert np.abs(centre - colour).max() < 6  # the page's own colour (JPEG inside the PDF)


@pytest.mark.parametrize(("dpi", "size"), [(72, (200, 100)), (144, (400, 200)), (36, (100, 50)), (300, (833, 417))])
def test_render_size_follows_dpi(tmp_path, dpi, size):
    path = tmp_path / "one.pdf"
    path.write_bytes(minimal_pdf([(200, 100)]))
    ((index, image),) = list(pdf.render_pages(path, dpi=dpi))
    assert index == 0 and image.mode == "RGB"
    assert abs(image.width - size[0]) <= 1 and abs(image.height - size[1]) <= 1
    assert np.asarray(image).min() == 255  # an empty page renders white


@pytest.mark.parametrize("dpi", [0, 17, 1201, -144])
def test_render_refuses_bad_dpi(seven_pages, dpi):
    with pytest.raises(ValueError, match="dpi"):
        list(pdf.render_pages(seven_pages, dpi=dpi))


@pytest.mark.parametrize(
    ("spec", "indices"),
    [
        ("1-3,7", [0, 1, 2, 6]),
        ("2", [1]),
        ("3-", [2, 3, 4, 5, 6]),
        ("-2", [0, 1]),
        ("1-3,2-4", [0, 1, 2, 3]),
        ("7,1-2", [6, 0, 1]),
        ("5-99", [4, 5, 6]),
        (" 2 , 4 ", [1, 3]),
        ("3,3,3", [2]),
        (None, list(range(7))),
        ("", list(range(7))),
    ],
)
def test_render_page_ranges(seven_pages, spec, indices):
    pages = list(pdf.render_pages(seven_pages, pages=spec))
    assert [i for i, _ in pages] == indices
    for index, image in pages:  # the right page was rendered, not just numbered
        centre = np.asarray(image)[50:150, 75:225].reshape(-1, 3).mean(0)
        assert np.abs(centre - COLOURS[index]).max() < 6


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("8", "past the end"),
        ("9-12", "past the end"),
        ("0", "below 1"),
        ("3-1", "empty"),
        ("-0", "empty"),
        ("a", "not like"),
        ("1-b", "not like"),
        ("1,,2", "not like"),
        ("1.5", "not like"),
        ("1-3,", "not like"),
        ("1--3", "not like"),
        ("1-2-3", "not like"),
        (" ", "not like"),
    ],
)
def test_bad_page_ranges(seven_pages, spec, match):
    with pytest.raises(ValueError, match=match):
        pdf.parse_pages(spec, 7)
    with pytest.raises(ValueError, match=match):
        list(pdf.render_pages(seven_pages, pages=spec))


def test_max_pages_limit(seven_pages):
    with pytest.raises(ValueError, match="limit of 3"):
        list(pdf.render_pages(seven_pages, max_pages=3))
    assert len(list(pdf.render_pages(seven_pages, pages="1-3", max_pages=3))) == 3


# --------------------------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("maker", ["pdfium", "hand"])
def test_empty_pdf(tmp_path, maker):
    path = tmp_path / "empty.pdf"
    if maker == "pdfium":
        doc = pdfium.PdfDocument.new()
        doc.save(str(path))
        doc.close()
    else:
        path.write_bytes(minimal_pdf([]))
    # PDFium refuses to load a document without pages, with no error code of its own (so the wording depends
    # on the previous failure: see the test below); the error is a ValueError that names the file.
    with pytest.raises(ValueError, match="empty.pdf"):
        pdf.page_count(path)
    with pytest.raises(ValueError, match="empty.pdf"):
        list(pdf.render_pages(path))


def test_empty_pdf_after_encrypted_is_not_called_encrypted(tmp_path):
    encrypted, empty = tmp_path / "locked.pdf", tmp_path / "empty.pdf"
    encrypted.write_bytes(minimal_pdf([(200, 100)], user_password=b"secret"))
    empty.write_bytes(minimal_pdf([]))
    with pytest.raises(ValueError, match="encrypted"):
        pdf.page_count(encrypted)
    with pytest.raises(ValueError) as info:
        pdf.page_count(empty)
    assert "decrypt" not in str(info.value)


def test_corrupt_files(tmp_path, seven_pages):
    data = seven_pages.read_bytes()
    cases = {
        "random.pdf": np.random.default_rng(0).bytes(4000),
        "zero.pdf": b"",
        "header-only.pdf": b"%PDF-1.7\n",
        "half.pdf": data[: len(data) // 2],
        "text.pdf": b"hello world\n" * 50,
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match="not a readable PDF"):
            pdf.page_count(path)
        with pytest.raises(ValueError, match=name):
            list(pdf.render_pages(path))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pdf"):
        pdf.page_count(tmp_path / "nope.pdf")
    with pytest.raises(FileNotFoundError):
        list(pdf.render_pages(tmp_path / "nope.pdf"))
    with pytest.raises(FileNotFoundError):
        pdf.page_count(tmp_path)  # a folder is not a PDF file


def test_encrypted_pdf(tmp_path):
    path = tmp_path / "locked.pdf"
    path.write_bytes(minimal_pdf([(200, 100)], user_password=b"secret"))
    doc = pdfium.PdfDocument(str(path), password="secret")  # the file is a real encrypted PDF
    assert len(doc) == 1
    doc.close()
    with pytest.raises(ValueError, match="encrypted"):
        pdf.page_count(path)
    with pytest.raises(ValueError, match="encrypted"):
        list(pdf.render_pages(path))


def test_huge_page_refused_before_rendering(tmp_path, monkeypatch):
    path = tmp_path / "poster.pdf"
    path.write_bytes(minimal_pdf([(200, 100), (20000, 20000)]))
    rendered = []
    original = pdfium.PdfPage.render

    def render(self, *args, **kwargs):
        rendered.append(self.get_size())
        assert max(self.get_size()) < 20000, "the huge page was rendered"
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pdfium.PdfPage, "render", render)
    with pytest.raises(ValueError, match="40000x40000 pixels"):
        list(pdf.render_pages(path, pages="2"))
    assert rendered == []
    pages = pdf.render_pages(path)
    assert next(pages)[0] == 0  # the small page before it still renders
    with pytest.raises(ValueError, match="lower the DPI"):
        next(pages)
    assert rendered == [(200.0, 100.0)]
    with pytest.raises(ValueError, match="page 2"):
        list(pdf.render_pages(path, pages="2", dpi=36))  # still 10000x10000 at 36 DPI


# --------------------------------------------------------------------------------------------------------------
# Detection and writing
# --------------------------------------------------------------------------------------------------------------


def test_is_pdf(tmp_path, seven_pages):
    assert pdf.is_pdf(seven_pages)
    assert pdf.is_pdf(tmp_path / "missing.PDF")  # by suffix, any case, even before it exists
    disguised = tmp_path / "scan.bin"
    disguised.write_bytes(seven_pages.read_bytes())
    assert pdf.is_pdf(disguised) and pdf.is_pdf(str(disguised))  # by magic bytes
    png = tmp_path / "page.png"
    Image.new("RGB", (10, 10)).save(png)
    assert not pdf.is_pdf(png)
    short = tmp_path / "short"
    short.write_bytes(b"%PD")
    assert not pdf.is_pdf(short)
    assert not pdf.is_pdf(tmp_path / "missing")
    assert not pdf.is_pdf(tmp_path)  # a folder


def test_save_images_as_pdf_round_trip(tmp_path):
    images = [
        Image.new("RGB", (300, 200), (200, 20, 20)),
        Image.new("RGBA", (120, 240), (20, 20, 200, 255)),
        Image.new("L", (64, 64), 90),
    ]
    path = tmp_path / "layouts.pdf"
    pdf.save_images_as_pdf(images, path)
    assert path.read_bytes().startswith(b"%PDF-") and pdf.is_pdf(path)
    doc = pdfium.PdfDocument(str(path))
    try:
        assert len(doc) == 3
        for i, image in enumerate(images):
            width, height = doc[i].get_size()
            assert (width, height) == pytest.approx((image.width / 2, image.height / 2), abs=0.01)  # 144 DPI
    finally:
        doc.close()
    rendered = list(pdf.render_pages(path))  # at 144 DPI the pictures come back at their own size
    assert [im.size for _, im in rendered] == [im.size for im in images]
    expected = [(200, 20, 20), (20, 20, 200), (90, 90, 90)]
    for (_, im), colour in zip(rendered, expected):
        assert np.abs(np.asarray(im, np.float64).reshape(-1, 3).mean(0) - colour).max() < 4


def test_save_images_as_pdf_with_nothing_writes_nothing(tmp_path):
    path = tmp_path / "none.pdf"
    pdf.save_images_as_pdf([], path)
    assert not os.path.exists(path)


# --------------------------------------------------------------------------------------------------------------
# The searchable PDF: page images with an invisible text layer at the grounding boxes
# --------------------------------------------------------------------------------------------------------------

PDFTOTEXT = shutil.which("pdftotext")
needs_pdftotext = pytest.mark.skipif(PDFTOTEXT is None, reason="pdftotext (poppler-utils) is not installed")
NON_ASCII = "Größe 10 µm – 東京"
PARAGRAPH = "The quick brown fox jumps over the lazy dog, " * 6 + "and stops."


def span(label: str, det: str) -> str:
    return f"<|ref|>{label}<|/ref|><|det|>{det}<|/det|>"


def page_result(raw: str, size=(1000, 1400), dpi: float | None = None, page: int | None = None) -> OCRResult:
    """A result as the pipeline makes it: a page-like picture and the blocks of ``raw``."""
    image = Image.new("RGB", size, (250, 250, 245))
    draw = ImageDraw.Draw(image)
    for y in range(60, size[1] - 60, 40):
        draw.rectangle((80, y, size[0] - 80, y + 14), fill=(40, 40, 40))  # "printed lines"
    if dpi is not None:
        image.info["dpi"] = (dpi, dpi)
    blocks = parse_blocks(raw, *size, page or 0)
    return OCRResult([], raw, raw, "stop", 0, 0, blocks=blocks, page=page, image=image)


FIRST = (
    span("title", "[[80, 30, 920, 70]]")
    + "\n# Quarterly report\n\n"
    + span("text", "[[80, 90, 920, 260]]")
    + f"\n{PARAGRAPH}\n\n"
    + span("image", "[[80, 280, 500, 480]]")
    + "\n\n"
    + span("text", "[[80, 500, 600, 540]]")
    + f"\n{NON_ASCII}\n\n"
    + span("table", "[[80, 560, 920, 700]]")
    + "\n<table><tr><td>Name</td><td>Value</td></tr><tr><td>a &amp; b</td><td>42</td></tr></table>"
)
SECOND = (
    span("text", "[[100, 100, 900, 160]]")
    + "\nSecond page text\n\n"
    + span("text", "[[100, 700, 900, 760]]")
    + ("\nThe end.")
)


def words(text: str) -> str:
    return " ".join(text.split())


def pdftotext(path: Path, page: int, raw: bool = False) -> str:
    args = [PDFTOTEXT, "-f", str(page), "-l", str(page), *(["-raw"] if raw else []), "-enc", "UTF-8", str(path), "-"]
    run = subprocess.run(args, capture_output=True, text=True, encoding="utf-8", check=True)
    assert run.stderr == ""
    return run.stdout


def pdfium_text(path: Path) -> list[str]:
    doc = pdfium.PdfDocument(str(path))
    try:
        return [doc[i].get_textpage().get_text_range() for i in range(len(doc))]
    finally:
        doc.close()


EXPECTED_FIRST = ["Quarterly report", PARAGRAPH, NON_ASCII, "Name Value a & b 42"]
EXPECTED_SECOND = ["Second page text", "The end."]


def test_searchable_pdf_text_comes_back_page_by_page_in_reading_order(tmp_path):
    path = pdf.save_searchable_pdf([page_result(FIRST), page_result(SECOND)], tmp_path / "doc.pdf")
    assert path == tmp_path / "doc.pdf" and path.read_bytes().startswith(b"%PDF-")
    # pdfium's own extraction (what Chrome and pypdfium2 users get) holds every block in order, exactly.
    first, second = (words(t) for t in pdfium_text(path))
    assert first == words(" ".join(EXPECTED_FIRST)) and second == words(" ".join(EXPECTED_SECOND))


@needs_pdftotext
def test_searchable_pdf_with_pdftotext(tmp_path):
    path = pdf.save_searchable_pdf([page_result(FIRST), page_result(SECOND)], tmp_path / "doc.pdf")
    for page, expected in ((1, EXPECTED_FIRST), (2, EXPECTED_SECOND)):
        assert words(pdftotext(path, page, raw=True)) == words(" ".join(expected))  # content order
        text = words(pdftotext(path, page))  # poppler's own reading order: each block whole, in order
        positions = [text.find(words(block)) for block in expected]
        assert -1 not in positions and positions == sorted(positions), (text, expected)
    assert NON_ASCII in pdftotext(path, 1)


def test_searchable_pdf_round_trips_any_script(tmp_path):
    texts = [
        NON_ASCII,
        "Ελληνικά кириллица 한국어 テキスト",
        "emoji 😀 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 beyond the BMP, tab\there",
        "السعر 1,250.50 ريال (تقريبا)",  # right to left, with a number and brackets
        "עמוד 3 מתוך 10",
    ]
    boxes = [f"[[50, {100 + 150 * i}, 950, {150 + 150 * i}]]" for i in range(len(texts))]
    raw = "".join(span("text", box) + f"\n{t}\n" for box, t in zip(boxes, texts))
    path = pdf.save_searchable_pdf([page_result(raw)], tmp_path / "scripts.pdf")
    expected = [t.replace("\t", " ") for t in texts]
    assert pdfium_text(path)[0].split("\r\n") == expected
    if PDFTOTEXT:  # poppler's -raw mode keeps right-to-left words in visual order: left-to-right lines only
        assert pdftotext(path, 1, raw=True).split("\n")[:3] == expected[:3]


def test_visual_order_is_the_bidirectional_algorithm():
    assert pdf.visual_order("plain 12.5% text") == "plain 12.5% text"
    assert pdf.visual_order("שלום עולם 123") == "123 םלוע םולש"
    assert pdf.visual_order("abc שלום 123 def") == "abc 123 םולש def"
    assert pdf.visual_order("مرحبا ABC 12 عالم") == "ملاع ABC 12 ابحرم"
    assert pdf.visual_order("ريال (1,250.50)") == "(1,250.50) لاير"


def render(path: Path, page: int, scale: float) -> np.ndarray:
    doc = pdfium.PdfDocument(str(path))
    try:
        return np.asarray(doc[page].render(scale=scale).to_pil().convert("RGB"), np.int16)
    finally:
        doc.close()


def test_searchable_pdf_text_is_invisible(tmp_path):
    result = page_result(FIRST, dpi=144)
    with_text = pdf.save_searchable_pdf([result], tmp_path / "text.pdf")
    bare = OCRResult([], "", "", "stop", 0, 0, image=result.image)
    without = pdf.save_searchable_pdf([bare], tmp_path / "bare.pdf")
    shown = render(with_text, 0, 2)  # 144 DPI: the page image's own pixels
    assert shown.shape[:2] == (result.image.height, result.image.width)
    assert np.array_equal(shown, render(without, 0, 2))  # the text layer paints nothing
    diff = np.abs(shown - np.asarray(result.image, np.int16))
    assert diff.mean() < 2 and np.percentile(diff, 99.9) < 48  # the JPEG of the page, nothing else


def test_searchable_pdf_page_size_follows_the_dpi(tmp_path):
    results = [
        page_result(SECOND, size=(1224, 1584), dpi=144),  # a Letter page rendered at 144 DPI
        page_result(SECOND, size=(600, 400)),  # an image that records no DPI: a pixel is a point
        page_result(SECOND, size=(2550, 3300), dpi=300),  # a 300-DPI scan: Letter again
        page_result(SECOND, size=(30_000, 200)),  # too wide for 72 DPI: fitted to 200 inches
    ]
    path = pdf.save_searchable_pdf(results, tmp_path / "sizes.pdf")
    doc = pdfium.PdfDocument(str(path))
    try:
        sizes = [doc[i].get_size() for i in range(len(doc))]
    finally:
        doc.close()
    expected = [(612, 792), (600, 400), (612, 792), (pdf.MAX_PAGE_POINTS, 200 * pdf.MAX_PAGE_POINTS / 30_000)]
    assert sizes == [pytest.approx(s, abs=0.01) for s in expected]


def test_rendered_pages_record_their_dpi(seven_pages):
    _, image = next(pdf.render_pages(seven_pages, "1", dpi=200))
    assert image.info["dpi"] == (200, 200) and pdf.image_dpi(image) == 200
    assert pdf.image_dpi(Image.new("RGB", (10, 10))) == 72
    odd = Image.new("RGB", (10, 10))
    odd.info["dpi"] = (1, 1)  # JPEGs from some cameras: an aspect ratio, not a resolution
    assert pdf.image_dpi(odd) == 72


def test_searchable_pdf_page_without_blocks_and_without_images(tmp_path):
    blank = page_result("Free OCR text without grounding")
    path = pdf.save_searchable_pdf([blank, page_result(SECOND)], tmp_path / "mixed.pdf")
    texts = pdfium_text(path)
    assert len(texts) == 2 and texts[0] == "" and words(texts[1]) == words(" ".join(EXPECTED_SECOND))
    no_image = OCRResult([], "text", "text", "stop", 0, 0)
    assert len(pdfium_text(pdf.save_searchable_pdf([no_image, blank], tmp_path / "one.pdf"))) == 1
    with pytest.raises(ValueError, match="no page images"):
        pdf.save_searchable_pdf([no_image], tmp_path / "none.pdf")
    assert not (tmp_path / "none.pdf").exists()


def test_searchable_pdf_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "doc.pdf"
    path.write_bytes(b"the previous file")
    real_save = pdfium.PdfDocument.save

    def half_then_fail(self, dest, *args, **kwargs):
        Path(dest).write_bytes(b"%PDF-1.7 half")
        assert path.read_bytes() == b"the previous file"  # written beside it, never over it
        raise KeyboardInterrupt

    monkeypatch.setattr(pdfium.PdfDocument, "save", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        pdf.save_searchable_pdf([page_result(SECOND)], path)
    assert path.read_bytes() == b"the previous file" and sorted(p.name for p in tmp_path.iterdir()) == ["doc.pdf"]
    monkeypatch.setattr(pdfium.PdfDocument, "save", real_save)
    pdf.save_searchable_pdf([page_result(SECOND)], path)
    assert words(pdfium_text(path)[0]) == words(" ".join(EXPECTED_SECOND))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.pdf"]


def test_plain_lines_and_layout():
    assert pdf.plain_lines("## Heading **bold**\n\n<table><tr><th>a</th><td>b &lt; c</td></tr><tr><td>d</td></tr>") == [
        "Heading bold",
        "a b < c",
        "d",
    ]
    raw = (
        span("text", "[[100, 100, 900, 300], [100, 400, 900, 600]]")  # one span, two boxes: its text once
        + f"\n{PARAGRAPH}\nsecond line\n"
        + span("image", "[[0, 0, 50, 50]]")  # a figure: no text
        + span("text", "[[600, 600, 100, 100]]")  # reversed: nothing
        + "\nlost"
        + span("title", "[[10, 950, 990, 1200]]")  # past the bottom: clamped to the page
        + "\nShort"
    )
    blocks = parse_blocks(raw, 1000, 1000)
    lines = pdf.layout_text(blocks, 0.5, (500, 500))
    paragraph = [line for line in lines if line.top < 150]
    assert len(paragraph) > 2 and words(" ".join(line.text for line in paragraph)) == words(PARAGRAPH + " second line")
    box = blocks[0].box_px
    for line in paragraph:
        assert line.x == pytest.approx(box[0] * 0.5)
        assert box[1] * 0.5 - 0.01 <= line.top and line.top + line.size <= box[3] * 0.5 + 0.01
        assert line.width <= (box[2] - box[0]) * 0.5 + 0.01
    assert [line.text for line in lines if line.top >= 150] == ["Short"]
    short = lines[-1]
    assert short.top + short.size <= 500 + 1e-6 and short.width == pytest.approx(len("Short") * short.size)


def test_save_results_with_the_searchable_pdf(tmp_path):
    results = [page_result(FIRST, dpi=144, page=0), page_result(SECOND, dpi=144, page=2)]
    out = save_pdf_results(results, tmp_path / "out", "doc", searchable=True)
    assert len(pdfium_text(out / "doc_searchable.pdf")) == 2 and (out / "doc.mmd").is_file()
    assert not (save_pdf_results(results, tmp_path / "plain", "doc") / "doc_searchable.pdf").exists()
    single = results[1].save(tmp_path / "image", searchable=True)
    assert words(pdfium_text(single / "result_searchable.pdf")[0]) == words(" ".join(EXPECTED_SECOND))
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())


# --------------------------------------------------------------------------------------------------------------
# Page numbers: 1-based as --pages in JSON; the zero-based index only where official file names use it
# --------------------------------------------------------------------------------------------------------------


def test_json_page_numbers_agree_with_pages(tmp_path):
    results = [page_result(FIRST, page=0), page_result(SECOND, page=2)]
    out = save_pdf_results(results, tmp_path / "out", "doc")
    data = json.loads((out / "doc.json").read_text(encoding="utf-8"))
    assert [(d["page"], d["page_index"]) for d in data] == [(1, 0), (3, 2)]
    assert {(b["page"], b["page_index"]) for b in data[1]["blocks"]} == {(3, 2)}
    assert (out / "images" / "0_0.jpg").is_file()  # the official figure names keep the zero-based index
    image = page_result(SECOND).to_dict()
    assert image["page"] is None and image["page_index"] is None
    assert image["blocks"][0]["page"] == 1  # an image is page 1 of itself


def test_ocr_many_pages_spec_and_json_agree(tiny_model, tmp_path):
    pytest.importorskip("mlx.core")
    path = tmp_path / "doc.pdf"
    images = [Image.new("RGB", (200, 280), c) for c in COLOURS[:4]]
    images[0].save(path, "PDF", save_all=True, append_images=images[1:], resolution=72.0)
    results = list(tiny_model.ocr_many([path], pages="2,4", mode="tiny", max_new_tokens=2))
    assert [r.to_dict()["page"] for r in results] == [2, 4]
    assert [r.page for r in results] == [1, 3]  # the Python attribute stays zero-based
    out = save_pdf_results(results, tmp_path / "out", "doc", searchable=True)
    doc = pdfium.PdfDocument(str(out / "doc_searchable.pdf"))
    try:  # the searchable PDF's pages have the source pages' size (rendered at 144 DPI, placed back at 144)
        assert [doc[i].get_size() for i in range(len(doc))] == [pytest.approx((200, 280), abs=0.01)] * 2
    finally:
        doc.close()
