"""PDF input and output: page counts, rendering size, page ranges, clear errors for empty, corrupt, missing,
encrypted and huge documents, PDF detection, and the layout PDF written from pictures."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dsocr_mlx import pdf

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
