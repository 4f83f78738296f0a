"""The web page in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by Selenium)
against a real uvicorn: sign in, read an image with two models side by side, a 2-page PDF dropped on the page,
the history after a reload, deleting an entry, and model output that tries to run script.

Screenshots of the main states go to ``$DSOCR_TEST_ARTEFACTS`` (default: a pytest temporary folder).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from tests.test_server import KEY, running_server
from tests.test_webui import ScriptedModel

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM and DRIVER), reason="no Chromium: apt-get install chromium chromium-driver (.ci/run does)"
    ),
]

HOSTILE = (
    "<|ref|>text<|/ref|><|det|>[[100, 100, 600, 300]]<|/det|>\nHello <script>window.__pwned = 1</script>"
    ' <img src=x onerror="window.__pwned = 2"> <a href="javascript:window.__pwned = 3">link</a>'
    ' <iframe src="https://example.com"></iframe> <img src="https://example.com/t.png"> \\(x^2\\)\n'
)
FONTS = Path("/usr/share/fonts/truetype/dejavu")


def _font(name: str, size: int):
    try:
        return ImageFont.truetype(str(FONTS / name), size)
    except OSError:
        return ImageFont.load_default()


def staged_document() -> tuple[bytes, str]:
    """A page with a title, text, a table, a formula and a figure, and the output DeepSeek-OCR writes for such
    a page (its spans boxing each block): a staged result, for screenshots that show what the page does."""
    w, h = 1000, 1294
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    serif, sans, bold = _font("DejaVuSerif.ttf", 17), _font("DejaVuSans.ttf", 16), _font("DejaVuSans-Bold.ttf", 16)
    italic = _font("DejaVuSerif-Italic.ttf", 15)
    boxes: dict[str, tuple] = {}
    d.text((80, 70), "Reading Documents on a Laptop", font=_font("DejaVuSerif-Bold.ttf", 30), fill="black")
    boxes["title"] = (76, 64, 640, 110)
    d.text((80, 150), "1. Results", font=_font("DejaVuSerif-Bold.ttf", 22), fill="black")
    boxes["sub_title"] = (76, 146, 230, 180)
    para = [
        "We read 120 scanned pages with two precisions of the same model and",
        "compare their text with a reference transcription. The 4-bit weights",
        "keep the accuracy of half precision while reading pages faster and",
        "using a third of the memory.",
    ]
    for i, line in enumerate(para):
        d.text((80, 200 + i * 26), line, font=serif, fill="black")
    boxes["text"] = (76, 196, 760, 306)
    rows = [
        ["Model", "Precision", "Recall", "Pages/min"],
        ["float16", "0.962", "0.951", "11.8"],
        ["4-bit", "0.958", "0.949", "17.2"],
        ["DeepSeek-OCR-2", "0.971", "0.966", "9.4"],
    ]
    widths, top = [260, 170, 170, 170], 340
    for r, row in enumerate(rows):
        x = 80
        for c, cell in enumerate(row):
            d.rectangle((x, top + r * 40, x + widths[c], top + (r + 1) * 40), outline="black")
            d.text((x + 10, top + r * 40 + 10), cell, font=bold if r == 0 else sans, fill="black")
            x += widths[c]
    boxes["table"] = (78, top - 2, 80 + sum(widths) + 2, top + 162)
    d.text((80, 512), "Table 1: Accuracy and speed on 120 scanned pages.", font=italic, fill="black")
    boxes["table_caption"] = (76, 508, 520, 534)
    d.text((300, 570), "F1 = 2 P R / (P + R)", font=_font("DejaVuSerif-Italic.ttf", 24), fill="black")
    boxes["equation"] = (290, 560, 600, 608)
    fx, fy, fw, fh = 80, 650, 440, 330
    d.rectangle((fx, fy, fx + fw, fy + fh), outline="#999999")
    d.line((fx + 40, fy + 20, fx + 40, fy + fh - 40), fill="black", width=2)
    d.line((fx + 40, fy + fh - 40, fx + fw - 20, fy + fh - 40), fill="black", width=2)
    for i, (value, colour, label) in enumerate(
        [(11.8, "#4c78a8", "fp16"), (17.2, "#f58518", "4-bit"), (9.4, "#54a24b", "OCR-2")]
    ):
        x, y = fx + 80 + i * 120, fy + fh - 40 - value * 14
        d.rectangle((x, y, x + 70, fy + fh - 40), fill=colour)
        d.text((x + 10, fy + fh - 32), label, font=sans, fill="black")
        d.text((x + 14, y - 22), str(value), font=sans, fill="black")
    boxes["image"] = (fx, fy, fx + fw, fy + fh)
    d.text((80, 992), "Figure 1: Pages read per minute.", font=italic, fill="black")
    boxes["image_caption"] = (76, 988, 380, 1014)
    side = [
        "Throughput grows by 46% with",
        "4-bit weights. DeepSeek-OCR-2",
        "reads fewer pages per minute",
        "but makes the fewest errors,",
        "in tables above all.",
    ]
    for i, line in enumerate(side):
        d.text((560, 660 + i * 26), line, font=serif, fill="black")
    boxes["text2"] = (556, 656, 900, 790)

    def span(label: str, key: str) -> str:
        x1, y1, x2, y2 = boxes[key]
        box = [round(x1 / w * 999), round(y1 / h * 999), round(x2 / w * 999), round(y2 / h * 999)]
        return f"<|ref|>{label}<|/ref|><|det|>[{box}]<|/det|>\n"

    cells = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    raw = (
        span("title", "title") + "# Reading Documents on a Laptop\n\n"
        + span("sub_title", "sub_title") + "## 1. Results\n\n"
        + span("text", "text") + " ".join(para) + "\n\n"
        + span("table", "table") + f"<table>{cells}</table>\n\n"
        + span("table_caption", "table_caption") + "Table 1: Accuracy and speed on 120 scanned pages.\n\n"
        + span("equation", "equation") + "\\[\nF_1 = \\frac{2PR}{P + R}\n\\]\n\n"
        + span("image", "image") + "\n\n"
        + span("image_caption", "image_caption") + "Figure 1: Pages read per minute.\n\n"
        + span("text", "text2") + " ".join(side) + "\n"
    )  # fmt: skip
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue(), raw


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("DSOCR_TEST_ARTEFACTS") or tmp_path_factory.mktemp("browser-artefacts"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def page_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("page-files")
    data, raw = staged_document()
    (folder / "report.png").write_bytes(data)
    first = Image.open(io.BytesIO(data)).convert("RGB")
    first.save(folder / "two-pages.pdf", save_all=True, append_images=[first.rotate(180)], resolution=144)
    return folder, raw


@pytest.fixture(scope="module")
def served(tiny_ckpt, tiny_model, page_files, tmp_path_factory):
    _, raw = page_files
    scripted = {
        "staged": ScriptedModel(tiny_model, [raw], delay=0.004),
        "hostile": ScriptedModel(tiny_model, [HOSTILE]),
    }
    models = {name: str(tiny_ckpt.parent / name) for name in scripted}  # named after their (absent) folders
    history = tmp_path_factory.mktemp("browser-history")
    with running_server(
        tiny_ckpt, models, loader=lambda path: scripted.get(Path(path).name, tiny_model), history_dir=str(history)
    ) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1440,1000",
    ):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=options)
    yield driver
    driver.quit()


def wait(driver, predicate, timeout: float = 30):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(predicate)


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def pick_models(driver, names: list[str]) -> None:
    for box in driver.find_elements(By.CSS_SELECTOR, "#models input"):
        if (box.get_attribute("value") in names) != box.is_selected():
            box.click()


def read(driver, shot: Path | None = None) -> str:
    """Click Read and wait for the entry (its id lands in the address); returns the id."""
    before = js(driver, "return location.hash")
    driver.find_element(By.ID, "run").click()
    if shot is not None:  # the staged model writes a few characters per token: catch it mid-page
        wait(
            driver,
            lambda d: js(
                d, "const s = document.querySelector('.text .streaming'); return s && s.textContent.length > 80"
            ),
        )
        driver.save_screenshot(str(shot))
    wait(
        driver,
        lambda d: (
            js(d, "return location.hash") not in ("", before)
            and js(d, "return !document.getElementById('run').disabled")
        ),
    )
    return js(driver, "return location.hash").removeprefix("#h=")


def test_the_page_end_to_end(served, browser, page_files, artefacts):
    start = time.monotonic()
    files, _ = page_files
    d = browser
    d.get(served + "/")
    # The server has an API key: the page asks for it, and the login cookie carries every later request.
    wait(d, lambda d: js(d, "return document.getElementById('login').open"))
    d.find_element(By.ID, "login-key").send_keys("wrong")
    d.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait(d, lambda d: "incorrect" in d.find_element(By.ID, "login-error").text)
    d.find_element(By.ID, "login-key").clear()
    d.find_element(By.ID, "login-key").send_keys(KEY)
    d.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait(d, lambda d: js(d, "return document.body.dataset.ready === '1'"))
    assert [b.get_attribute("value") for b in d.find_elements(By.CSS_SELECTOR, "#models input")] == [
        "tiny",
        "staged",
        "hostile",
    ]

    # An image, two models side by side: the text streams, then boxes over the page and the diff.
    pick_models(d, ["tiny", "staged"])
    d.find_element(By.ID, "file").send_keys(str(files / "report.png"))
    image_id = read(d, artefacts / "1-streaming.png")
    staged = d.find_element(By.CSS_SELECTOR, '.variant[data-model="staged"]')
    boxes = staged.find_elements(By.CSS_SELECTOR, ".overlay .box")
    assert len(boxes) == 9 and "Reading Documents on a Laptop" in staged.find_element(By.CSS_SELECTOR, ".text").text
    assert staged.find_elements(By.CSS_SELECTOR, ".text .katex") and staged.find_elements(
        By.CSS_SELECTOR, ".text table td"
    )
    assert (
        staged.find_element(By.CSS_SELECTOR, ".text img.crop").get_attribute("naturalWidth") != "0"
    )  # the figure crop
    assert len(d.find_elements(By.CSS_SELECTOR, '.variant[data-model="tiny"] .text .md')) == 1
    ActionChains(d).move_to_element(boxes[3]).perform()  # hovering the table's box lights its text up
    wait(
        d,
        lambda d: (
            staged.find_element(By.CSS_SELECTOR, '.text .blk[data-span="3"]').get_attribute("class").endswith("hl")
        ),
    )
    table_text = staged.find_element(By.CSS_SELECTOR, '.text .blk[data-span="3"]')
    ActionChains(d).move_to_element(table_text).perform()  # and hovering the text lights its box up
    wait(d, lambda d: "hl" in boxes[3].get_attribute("class"))
    d.save_screenshot(str(artefacts / "2-two-models.png"))
    d.find_element(By.ID, "diff-toggle").click()
    assert d.find_elements(By.CSS_SELECTOR, ".diff-body ins") and d.find_elements(By.CSS_SELECTOR, ".diff-body del")
    d.save_screenshot(str(artefacts / "3-diff.png"))
    d.find_element(By.ID, "diff-toggle").click()

    # A 2-page PDF, dropped on the page: per-page status, then page navigation with each page's boxes.
    pick_models(d, ["staged"])
    pdf = base64.b64encode((files / "two-pages.pdf").read_bytes()).decode()
    js(
        d,
        """const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'two-pages.pdf', {type: 'application/pdf'}));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));""",
        pdf,
    )
    assert "two-pages.pdf" in d.find_element(By.ID, "file-name").text
    pdf_id = read(d)
    pages = d.find_elements(By.CSS_SELECTOR, ".pager .pg")
    assert [p.text for p in pages] == ["1", "2"] and all("done" in p.get_attribute("class") for p in pages)
    pages[0].click()
    wait(d, lambda d: "current" in d.find_elements(By.CSS_SELECTOR, ".pager .pg")[0].get_attribute("class"))
    assert len(d.find_elements(By.CSS_SELECTOR, ".overlay .box")) == 9
    d.find_element(By.CSS_SELECTOR, '#views button[data-view="blocks"]').click()
    assert len(d.find_elements(By.CSS_SELECTOR, ".blocks-table tbody tr")) == 9
    d.find_element(By.CSS_SELECTOR, '#views button[data-view="rendered"]').click()
    d.save_screenshot(str(artefacts / "4-pdf.png"))

    # Model output that tries to run script, load remote content or link to javascript: stays inert.
    pick_models(d, ["hostile"])
    d.find_element(By.ID, "file").send_keys(str(files / "report.png"))
    read(d)
    assert d.find_element(By.ID, "result-title").text == "report.png"  # the same file as before, picked again
    text = d.find_element(By.CSS_SELECTOR, '.variant[data-model="hostile"] .text')
    assert "Hello" in text.text and text.find_elements(By.CSS_SELECTOR, ".katex")
    assert js(d, "return window.__pwned") is None
    assert not js(d, "return document.querySelector('.text script, .text iframe, [onerror], a[href^=\"javascript\"]')")
    assert all(not (i.get_attribute("src") or "").startswith("https:") for i in d.find_elements(By.CSS_SELECTOR, "img"))
    d.save_screenshot(str(artefacts / "6-hostile.png"))

    # The history survives a reload (the cookie too: no key prompt); an entry opens and deletes.
    d.get(served + "/")
    wait(d, lambda d: js(d, "return document.body.dataset.ready === '1'"))
    assert not js(d, "return document.getElementById('login').open")
    items = d.find_elements(By.CSS_SELECTOR, "#history li")
    assert [i.get_attribute("data-id") for i in items][1:] == [pdf_id, image_id]
    items[2].click()
    wait(
        d,
        lambda d: (
            js(d, "return location.hash") == f"#h={image_id}" and d.find_elements(By.CSS_SELECTOR, ".overlay .box")
        ),
    )
    d.save_screenshot(str(artefacts / "5-reloaded.png"))
    delete = d.find_element(By.CSS_SELECTOR, f'#history li[data-id="{image_id}"] .del')
    delete.click()
    assert delete.text == "Delete?"
    delete.click()
    wait(d, lambda d: not d.find_elements(By.CSS_SELECTOR, f'#history li[data-id="{image_id}"]'))
    assert js(d, "return document.getElementById('result').hidden")
    d.refresh()
    wait(d, lambda d: js(d, "return document.body.dataset.ready === '1'"))
    assert len(d.find_elements(By.CSS_SELECTOR, "#history li")) == 2
    assert js(d, "return window.__pwned") is None
    expected = ("Content Security Policy", "status of 401")  # the hostile output's blocked handlers; the key prompt
    errors = [
        e for e in d.get_log("browser") if e["level"] == "SEVERE" and not any(x in e["message"] for x in expected)
    ]
    assert not errors, errors
    assert time.monotonic() - start < 60
