"""The OCR pipeline: tasks, streaming, loop handling with retry, results and artefacts, many inputs and PDFs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dsocr_mlx.pipeline import OCRModel, build_prompt, join_pages, save_pdf_results
from dsocr_mlx.random_checkpoint import tiny_args
from dsocr_mlx.sampling import PDF_NGRAM, SamplingParams
from dsocr_mlx.tokenizer import Tokenizer

GROUNDED = (
    "<|ref|>title<|/ref|><|det|>[[10, 20, 500, 100]]<|/det|>\n# Quarterly report\n\n"
    "<|ref|>image<|/ref|><|det|>[[100, 200, 600, 800]]<|/det|>\n"
    "<|ref|>text<|/ref|><|det|>[[50, 850, 950, 990]]<|/det|>\nRevenue grew by 12 %."
)


class ScriptedRuntime:
    """A backend that plays back scripted token sequences, one per attempt, and records its settings."""

    name, dtype, device = "scripted", "float32", "cpu"

    def __init__(self, scripts: list[list[int]]):
        self.scripts = scripts
        self.calls: list[SamplingParams] = []

    def image_embeddings(self, inputs):
        return object()

    def decoder(self):
        return ScriptedDecoder(self)

    def generate(self, inputs, embeddings, max_tokens, params=None):
        decoder = self.decoder()
        row = decoder.add(inputs, embeddings, max_tokens, params)
        for _ in range(max_tokens):
            yield decoder.step()[row]

    def prefill_logits(self, inputs, embeddings):
        raise NotImplementedError

    def to_numpy(self, x):
        raise NotImplementedError

    def synchronize(self):
        pass


@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt):
    return Tokenizer.from_folder(tiny_ckpt)


class ScriptedDecoder:
    """The batch decoder of a :class:`ScriptedRuntime`: each row plays the script of its attempt (a script
    that runs out repeats its last token, as a model stuck in a loop would)."""

    def __init__(self, runtime: ScriptedRuntime):
        self.runtime, self.rows = runtime, {}

    def __len__(self):
        return len(self.rows)

    def add(self, inputs, embeddings, budget, params):
        calls = self.runtime.calls
        calls.append(params)
        script = self.runtime.scripts[min(len(calls) - 1, len(self.runtime.scripts) - 1)]
        self.rows[len(calls)] = iter(script[:budget] + script[-1:] * budget)
        return len(calls)

    def remove(self, row):
        self.rows.pop(row, None)

    def step(self):
        return {row: next(tokens) for row, tokens in self.rows.items()}


def scripted(tokenizer, *scripts) -> tuple[OCRModel, ScriptedRuntime]:
    runtime = ScriptedRuntime(list(scripts))
    return OCRModel(runtime, tokenizer, tiny_args()), runtime


def test_tasks_build_the_official_prompts():
    assert build_prompt() == "<image>\n<|grounding|>Convert the document to markdown."
    assert build_prompt(task="ocr") == "<image>\n<|grounding|>OCR this image."
    assert build_prompt(task="free") == "<image>\nFree OCR."
    assert build_prompt(task="figure") == "<image>\nParse the figure."
    assert build_prompt(task="describe") == "<image>\nDescribe this image in detail."
    assert build_prompt(task="locate", ref="the total") == "<image>\nLocate <|ref|>the total<|/ref|> in the image."
    assert build_prompt("<image>\nWhat is written?") == "<image>\nWhat is written?"
    for bad, match in (
        (dict(task="locate"), "needs the text"),
        (dict(task="poem"), "unknown task"),
        (dict(prompt="x", task="free"), "either a prompt or a task"),
    ):
        with pytest.raises(ValueError, match=match):
            build_prompt(**bad)


def test_stream_equals_non_stream_on_the_tiny_model(tiny_model, sample_image):
    kwargs = dict(task="free", mode="tiny", max_new_tokens=24)
    stream = list(tiny_model.stream_ocr(sample_image, **kwargs))
    result = tiny_model.ocr(sample_image, **kwargs)
    assert [r.token for r in stream] == result.token_ids
    assert "".join(r.text for r in stream).strip() == result.raw_text
    assert stream[-1].finish_reason == result.finish_reason and all(r.finish_reason is None for r in stream[:-1])
    assert stream[-1].generation_tokens == len(result.token_ids) and stream[-1].prompt_tokens == result.prompt_tokens


def test_grounded_output_becomes_blocks_markdown_and_artefacts(tokenizer, tmp_path):
    model, _ = scripted(tokenizer, tokenizer.encode(GROUNDED) + [1])
    image = Image.new("RGB", (1000, 2000), "white")
    result = model.ocr(image, mode="tiny")
    assert result.finish_reason == "stop" and result.token_ids[-1] == 1
    assert result.raw_text == GROUNDED
    assert result.text == "\n# Quarterly report\n\n![](images/0.jpg)\n\n\nRevenue grew by 12 %."
    assert [(b.label, b.box_px) for b in result.blocks] == [
        ("title", (10, 40, 500, 200)),
        ("image", (100, 400, 600, 1601)),
        ("text", (50, 1701, 950, 1981)),
    ]
    assert result.blocks[0].text == "# Quarterly report"
    assert result.usage["image_tokens"] == 73 and result.usage["completion_tokens"] == len(result.token_ids)

    out = result.save(tmp_path / "out")
    assert (out / "result.mmd").read_text() == result.text
    assert (out / "result_ori.mmd").read_text() == GROUNDED
    with Image.open(out / "result_with_boxes.jpg") as boxes:
        assert boxes.size == (1000, 2000)
    with Image.open(out / "images" / "0.jpg") as crop:
        assert crop.size == (500, 1201)
    data = json.loads((out / "result.json").read_text())
    assert data["finish_reason"] == "stop" and data["blocks"][1]["label"] == "image"
    assert data["usage"]["prompt_tokens"] == result.prompt_tokens
    with pytest.raises(FileExistsError):
        result.save(out)
    result.save(out, overwrite=True)


def test_a_loop_stops_early_and_is_retried_once_with_stronger_settings(tokenizer):
    unit = tokenizer.encode("The same sentence comes back again and again, forever. ")
    loop = unit * 200
    clean = tokenizer.encode("A clean second attempt.") + [1]
    model, runtime = scripted(tokenizer, loop, clean)
    result = model.ocr(Image.new("RGB", (300, 300)), mode="tiny", max_new_tokens=4000)
    assert result.retried and result.repetition.period == len(unit)
    assert result.finish_reason == "stop" and result.raw_text == "A clean second attempt."
    first, second = runtime.calls
    assert second.no_repeat_ngram_size <= first.no_repeat_ngram_size and second.ngram_window > first.ngram_window
    assert second.repetition_penalty > 1.0

    model, runtime = scripted(tokenizer, loop)
    stream = list(
        model.stream_ocr(Image.new("RGB", (300, 300)), mode="tiny", max_new_tokens=4000, retry_on_repetition=False)
    )
    assert stream[-1].finish_reason == "repetition" and len(stream) < 600  # stopped long before the limit
    assert stream[-1].result.finish_reason == "repetition" and not stream[-1].result.retried
    assert len(runtime.calls) == 1

    model, _ = scripted(tokenizer, loop * 2)
    kept = model.ocr(Image.new("RGB", (300, 300)), mode="tiny", max_new_tokens=4000, detect_loops=False)
    assert kept.finish_reason == "length" and kept.token_ids == (loop * 2)[:4000]


def test_streamed_retry_announces_a_restart(tokenizer):
    loop = tokenizer.encode("again and again ") * 300
    model, _ = scripted(tokenizer, loop, tokenizer.encode("fine") + [1])
    stream = list(model.stream_ocr(Image.new("RGB", (300, 300)), mode="tiny"))  # retry is the default
    restarts = [i for i, r in enumerate(stream) if r.restart]
    assert len(restarts) == 1 and stream[restarts[0]].repetition is not None
    assert all(r.finish_reason is None for r in stream[:-1])  # the loop's end is the restart, not a finish
    assert "".join(r.text for r in stream[restarts[0] + 1 :]) == "fine" and stream[-1].finish_reason == "stop"
    assert "".join(r.output for r in stream[restarts[0] + 1 :]) == "fine" == stream[-1].result.text
    assert stream[-1].result.retried


def test_sampling_settings_reach_the_backend(tokenizer):
    model, runtime = scripted(tokenizer, [5, 6, 1])
    model.ocr(
        Image.new("RGB", (64, 64)),
        mode="tiny",
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        seed=3,
        repetition_penalty=1.1,
        no_repeat_ngram_size=0,
    )
    params = runtime.calls[0]
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.5, 0.9, 40, 3)
    assert params.repetition_penalty == 1.1 and params.no_repeat_ngram_size == 0
    model.ocr(Image.new("RGB", (64, 64)), mode="tiny")
    assert (runtime.calls[1].no_repeat_ngram_size, runtime.calls[1].ngram_window) == (30, 90)


def test_max_new_tokens_is_bounded_by_the_context(tokenizer, tiny_model, sample_image):
    model, runtime = scripted(tokenizer, list(range(100, 20000)))
    result = model.ocr(sample_image, mode="gundam", max_new_tokens=100_000, detect_loops=False)
    assert len(result.token_ids) + result.prompt_tokens == tiny_args().text.max_position_embeddings
    with pytest.raises(ValueError, match="at least 1"):
        model.ocr(sample_image, max_new_tokens=0)


def make_pdf(path, pages: int) -> None:
    images = []
    for i in range(pages):
        img = Image.new("RGB", (420, 594), "white")
        img.paste((0, 0, 0), (40, 40 + 30 * i, 300, 60 + 30 * i))
        images.append(img)
    images[0].save(path, "PDF", save_all=True, append_images=images[1:], resolution=72)


def test_ocr_many_yields_pages_and_images_in_order(tokenizer, tmp_path, sample_image):
    pdf_path = tmp_path / "doc.pdf"
    make_pdf(pdf_path, 3)
    png = tmp_path / "page.png"
    Image.fromarray(sample_image).save(png)
    model, runtime = scripted(tokenizer, tokenizer.encode(GROUNDED) + [1])
    results = list(model.ocr_many([pdf_path, png], mode="tiny", pages="1,3"))
    assert [(r.source, r.page) for r in results] == [(str(pdf_path), 0), (str(pdf_path), 2), (str(png), None)]
    assert results[0].image.size == (840, 1188)  # 144 DPI: twice the page's points
    # PDF pages use the official PDF ban (20/50); images the image one (30/90).
    assert [(c.no_repeat_ngram_size, c.ngram_window) for c in runtime.calls] == [PDF_NGRAM, PDF_NGRAM, (30, 90)]
    assert "images/2_0.jpg" in results[1].text

    combined = join_pages(results[:2])
    assert combined.count("\n<--- Page Split --->\n") == 2 and combined.startswith(results[0].text)
    out = save_pdf_results(results[:2], tmp_path / "out", "doc")
    for name in ("doc.mmd", "doc_det.mmd", "doc_layouts.pdf", "doc.json", "images/0_0.jpg", "images/2_0.jpg"):
        assert (out / name).is_file(), name
    import pypdfium2

    assert len(pypdfium2.PdfDocument(str(out / "doc_layouts.pdf"))) == 2
    with pytest.raises(FileExistsError):
        save_pdf_results(results[:2], tmp_path / "out", "doc")


def test_bad_pdf_input_is_a_clear_error(tokenizer, tmp_path):
    bad = tmp_path / "broken.pdf"
    bad.write_bytes(b"%PDF-1.7\n garbage")
    model, _ = scripted(tokenizer, [1])
    with pytest.raises(ValueError, match="not a readable PDF"):
        list(model.ocr_many([bad]))


def test_vision_runs_once_per_image(tiny_model, sample_image, monkeypatch):
    calls = []
    original = tiny_model.runtime.image_embeddings
    monkeypatch.setattr(tiny_model.runtime, "image_embeddings", lambda inputs: calls.append(1) or original(inputs))
    tiny_model._vision_cache = None
    image = np.array(sample_image)
    tiny_model.ocr(image, task="free", mode="tiny", max_new_tokens=2)
    tiny_model.ocr(image, task="markdown", mode="tiny", max_new_tokens=2)
    assert len(calls) == 1
