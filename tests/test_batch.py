"""Batched decoding: rows of different prompt lengths that join and leave between steps decode exactly the
tokens they decode alone, on both backends, with their own sampling settings and logits processors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import dsocr_mlx
from dsocr_mlx.sampling import SamplingParams
from tests.conftest import assert_close
from tests.tolerances import CACHE

GREEDY = SamplingParams(no_repeat_ngram_size=0)


@pytest.fixture(scope="module", params=["mlx", "torch"])
def model(request, tiny_ckpt, tiny_model):
    if request.param == "mlx":
        return tiny_model
    pytest.importorskip("torch")
    return dsocr_mlx.load(str(tiny_ckpt), backend="torch", dtype="float32")


@pytest.fixture(scope="module")
def rows(model, sample_image):
    """Four prompts of four lengths: two modes, two tasks, one image cropped."""
    small = Image.fromarray(sample_image).crop((0, 0, 500, 380))
    cases = [
        (sample_image, "<image>\nFree OCR.", "tiny"),
        (sample_image, "<image>\n<|grounding|>Convert the document to markdown.", "small"),
        (small, "<image>\nParse the figure.", "base"),
        (small, "<image>\nDescribe this image in detail.", "tiny"),
    ]
    out = []
    for image, prompt, mode in cases:
        inputs = model.prepare(image, prompt, mode=mode)
        out.append((inputs, model.runtime.image_embeddings(inputs)))
    assert len({len(i.input_ids) for i, _ in out}) == 4
    return out


def alone(model, inputs, embeddings, n, params=GREEDY):
    return list(model.runtime.generate(inputs, embeddings, n, params))


def test_rows_that_join_and_leave_decode_their_own_tokens(model, rows):
    n = 10
    want = [alone(model, i, e, n) for i, e in rows]
    decoder = model.runtime.decoder()
    got: dict[int, list[int]] = {}
    ids = [decoder.add(rows[0][0], rows[0][1], n, GREEDY), decoder.add(rows[1][0], rows[1][1], n, GREEDY)]
    for step in range(n + 6):
        if step == 3:  # a longer prompt joins a running batch: the others are padded on the left
            ids.append(decoder.add(rows[2][0], rows[2][1], n, GREEDY))
        if step == 5:
            ids.append(decoder.add(rows[3][0], rows[3][1], n, GREEDY))
        for row, token in decoder.step().items():
            got.setdefault(row, []).append(token)
            if len(got[row]) == (4 if row == ids[1] else n):  # row 1 leaves early, the others go on
                decoder.remove(row)
    assert len(decoder) == 0
    assert got[ids[1]] == want[1][:4]
    for row, expected in zip([ids[0], ids[2], ids[3]], [want[0], want[2], want[3]]):
        assert got[row] == expected


def test_each_row_keeps_its_sampling_and_processors(model, rows):
    n = 12
    settings = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, no_repeat_ngram_size=0),
        SamplingParams(no_repeat_ngram_size=2, ngram_window=8),
        SamplingParams(repetition_penalty=1.3, no_repeat_ngram_size=0),
    ]
    want = [alone(model, i, e, n, p) for (i, e), p in zip(rows, settings)]
    decoder = model.runtime.decoder()
    ids = [decoder.add(i, e, n, p) for (i, e), p in zip(rows, settings)]
    got = {row: [] for row in ids}
    for _ in range(n):
        for row, token in decoder.step().items():
            got[row].append(token)
    assert [got[row] for row in ids] == want


def test_batch_logits_equal_each_rows_own(model, rows):
    """One step of a padded batch against each row's own cache: the same logits (float32)."""
    runtime, g = model.runtime, model.runtime.generation
    with runtime.inference():
        batch, singles, tokens = g.Batch(runtime.model), [], []
        for inputs, emb in rows:
            embeds = runtime.input_embeddings(inputs, emb)
            for _ in range(2):  # the same prefill twice: one cache joins the batch, one stays alone
                cache = g.row_cache(runtime.model, embeds.shape[1] + 4)
                logits = g.prefill(runtime.model, embeds, cache)
                (singles.append(cache) if _ else batch.add(cache))
            tokens.append(int(np.argmax(runtime.to_numpy(logits))))
        together = runtime.to_numpy(batch.logits(runtime.token_column([_token(runtime, t) for t in tokens])))
        for b, (cache, token) in enumerate(zip(singles, tokens)):
            single = g.Batch(runtime.model)
            single.add(cache)
            own = runtime.to_numpy(single.logits(runtime.token_column([_token(runtime, token)])))
            assert_close(together[b : b + 1], own, **CACHE, what=f"row {b}")


def _token(runtime, token: int):
    if runtime.name == "mlx":
        import mlx.core as mx

        return mx.array([token])
    import torch

    return torch.tensor([token])


def test_ocr_many_in_batches_gives_the_results_of_one_at_a_time(model, sample_image, tmp_path):
    """Images and PDF pages of several sizes and modes, in batches of 3: the same results, in input order,
    and the streamed text is each page's text, page after page."""
    rng = np.random.default_rng(5)
    doc = tmp_path / "doc.pdf"
    pages = [Image.fromarray(rng.integers(0, 255, (90 + 30 * i, 70, 3), dtype=np.uint8)) for i in range(3)]
    pages[0].save(doc, "PDF", save_all=True, append_images=pages[1:])
    inputs = [sample_image, doc, Image.fromarray(sample_image).crop((0, 0, 300, 200))]
    kwargs = dict(mode="tiny", max_new_tokens=9, task="free")
    one = list(model.ocr_many(inputs, **kwargs))
    streamed: list[str] = []
    batched = list(model.ocr_many(inputs, batch_size=3, on_text=streamed.append, **kwargs))
    assert [(r.source, r.page) for r in batched] == [(r.source, r.page) for r in one]
    assert [r.token_ids for r in batched] == [r.token_ids for r in one]
    assert [r.text for r in batched] == [r.text for r in one]
    assert "".join(streamed) == "".join(r.text for r in one)


def test_concurrent_requests_share_decode_steps(tiny_ckpt, tiny_model):
    """Eight streaming clients against a server with max_batch 8: their pages decode in one batch (rows
    join and leave between steps) and each gets the text it gets alone (temperature 0)."""
    import threading

    from tests.test_server import expected, image_message, png, running_server

    openai = pytest.importorskip("openai")
    runners = []

    class Recording:
        def __init__(self, model):
            self.model = model

        def __getattr__(self, name):
            return getattr(self.model, name)

        def stream_ocr(self, *args, **kwargs):
            from dsocr_mlx.engine import bound_runner

            runners.append(bound_runner())  # the worker's runner, bound to this job's thread
            yield from self.model.stream_ocr(*args, **kwargs)

    jobs = [(png(60 + i), 3 + 5 * (i % 3)) for i in range(8)]
    want = [expected(tiny_model, data, tokens).text for data, tokens in jobs]
    got: dict[int, str] = {}
    with running_server(tiny_ckpt, loader=lambda _: Recording(tiny_model), max_batch=8) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="test-key", max_retries=0, timeout=120)
        gate = threading.Barrier(8)

        def ask(i: int) -> None:
            data, tokens = jobs[i]
            gate.wait()
            stream = client.chat.completions.create(
                model="tiny", messages=image_message(data), max_tokens=tokens, stream=True
            )
            got[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert [got.get(i) for i in range(8)] == want
    assert max(r.widest for r in runners if r is not None) > 1  # decode steps were shared


def test_cli_batch_size_gives_the_same_results_in_input_order(tiny_ckpt, sample_image, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dsocr_mlx.cli import app

    monkeypatch.setenv("DSOCR_CONFIG", str(tmp_path / "config.toml"))
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(9)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (120 + 40 * i, 160, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    pages = [Image.fromarray(rng.integers(0, 255, (150, 100 + 30 * i, 3), dtype=np.uint8)) for i in range(3)]
    pages[0].save(folder / "doc.pdf", "PDF", save_all=True, append_images=pages[1:])
    base = ["ocr", str(folder), "--model", str(tiny_ckpt), "--dtype", "float32", "--max-new-tokens", "6", "--mode"]
    outputs = {}
    for size in ("1", "4"):
        out = tmp_path / f"out{size}"
        result = CliRunner().invoke(app, [*base, "tiny", "--out", str(out), "--batch-size", size])
        assert result.exit_code == 0, result.output
        lines = [line for line in result.stderr.splitlines() if line.startswith("dsocr: [")]
        assert [line.split("]")[0] for line in lines] == ["dsocr: [1/4", "dsocr: [2/4", "dsocr: [3/4", "dsocr: [4/4"]
        outputs[size] = {p.relative_to(out): p.read_text() for p in sorted(out.rglob("*.mmd"))}
    assert outputs["1"] == outputs["4"] and len(outputs["1"]) == 3 * 2 + 2  # result.mmd, result_ori.mmd; doc*.mmd


def _noise(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (90, 120, 3), dtype=np.uint8))


def _run_engine(engine, pages, steps: int = 200) -> dict:
    """Step ``engine`` until ``pages`` are done (or ``steps`` ran out): each page's result or exception."""
    outcomes = {}
    for _ in range(steps):
        for page, response in engine.step():
            if isinstance(response, Exception):
                outcomes[id(page)] = response
            elif response.result is not None:
                outcomes[id(page)] = response.result
        if all(p.done for p in pages):
            break
    return {i: outcomes.get(id(p)) for i, p in enumerate(pages)}


def test_a_page_whose_vision_fails_fails_alone(tiny_model, monkeypatch):
    """Pages whose vision towers run in one call: the failing one gets its error, the others decode on."""
    from dsocr_mlx.engine import BatchEngine

    images = [_noise(seed) for seed in (1, 2, 3)]
    kwargs = dict(mode="tiny", task="free", max_new_tokens=5, retry_on_repetition=False)
    want = [tiny_model.ocr(im, **kwargs).token_ids for im in images]
    bad = tiny_model.prepare(images[1], mode="tiny").global_pixels[0]
    runtime, real = tiny_model.runtime, tiny_model.runtime.image_embeddings

    def failing(inputs):
        if any(np.array_equal(g, bad) for g in inputs.global_pixels):
            raise RuntimeError("out of memory in the vision towers")
        return real(inputs)

    monkeypatch.setattr(runtime, "image_embeddings", failing)
    tiny_model.clear_vision_cache()
    engine = BatchEngine(tiny_model, 3)
    pages = [engine.submit(im, **kwargs) for im in images]
    got = _run_engine(engine, pages)
    assert isinstance(got[1], RuntimeError)
    assert [got[0].token_ids, got[2].token_ids] == [want[0], want[2]]
    assert len(engine) == 0


def test_pages_without_images_decode_together(tiny_model):
    from dsocr_mlx.engine import BatchEngine

    prompts = ["Tell me a story.", "Write a poem about the sea."]
    want = [tiny_model.ocr(None, p, max_new_tokens=5).token_ids for p in prompts]
    engine = BatchEngine(tiny_model, 2)
    pages = [engine.submit(None, p, max_new_tokens=5) for p in prompts]
    got = _run_engine(engine, pages)
    assert [got[0].token_ids, got[1].token_ids] == want


def test_run_items_lets_go_of_each_page_once_it_is_done(tiny_model, tmp_path, monkeypatch):
    """A long run holds the pages in flight, not every page it has read (each holds its pixels)."""
    import gc
    import weakref

    from dsocr_mlx import batch
    from dsocr_mlx.engine import BatchEngine
    from dsocr_mlx.options import OCROptions

    refs, real = [], BatchEngine.submit
    monkeypatch.setattr(BatchEngine, "submit", lambda *a, **k: refs.append(weakref.ref(page := real(*a, **k))) or page)
    rng = np.random.default_rng(4)
    pages = [Image.fromarray(rng.integers(0, 255, (90, 70, 3), dtype=np.uint8)) for _ in range(5)]
    pages[0].save(tmp_path / "doc.pdf", "PDF", save_all=True, append_images=pages[1:])
    for i in range(2):
        pages[i].save(tmp_path / f"p{i}.png")
    live = []

    class Events:
        def __getattr__(self, name):
            return lambda *args: None

        def page_done(self, result):
            gc.collect()
            live.append(sum(r() is not None for r in refs))

    items = batch.expand_inputs([str(tmp_path / n) for n in ("doc.pdf", "p0.png", "p1.png")])
    options = OCROptions(mode="tiny", max_new_tokens=3)
    outcomes = list(batch.run_items(tiny_model, items, options, events=Events(), batch_size=2))
    assert [len(o.results) for o in outcomes] == [5, 1, 1] and len(refs) == 7
    assert max(live) <= 3  # the pages decoding (2), and the one just finished


def test_a_page_whose_result_fails_fails_alone(tiny_model, monkeypatch):
    """A page that fails as it finishes (its text or result) gets the error; a page finishing in the same
    step still gets its result (a server's job would otherwise wait for it forever)."""
    from dsocr_mlx.engine import BatchEngine

    images = [_noise(seed) for seed in (1, 2)]
    kwargs = dict(mode="tiny", task="free", max_new_tokens=4, retry_on_repetition=False, detect_loops=False)
    want = tiny_model.ocr(images[1], **kwargs).token_ids
    engine = BatchEngine(tiny_model, 2)
    pages = [engine.submit(im, **kwargs) for im in images]
    real = BatchEngine._finish

    def finish(self, page, response):
        if page is pages[0]:
            raise RuntimeError("the result could not be built")
        return real(self, page, response)

    monkeypatch.setattr(BatchEngine, "_finish", finish)
    got = _run_engine(engine, pages)
    assert isinstance(got[0], RuntimeError) and got[1].token_ids == want
    assert len(engine) == 0


def test_a_page_sent_as_the_runner_closes_is_refused_without_touching_the_batch(tiny_model):
    """A reader that finds the runner closed after queueing its page gets the error; the batch (and the
    model under it) stays the owner thread's, which empties it as it closes."""
    from dsocr_mlx.engine import BatchEngine, BatchRunner, prepare_page

    engine = BatchEngine(tiny_model, 2)
    runner = BatchRunner(engine, wake=lambda: setattr(runner, "closed", RuntimeError("shutting down")))
    running = engine.submit(None, "Tell me a story.", max_new_tokens=50)
    engine.step()  # decoding: a row of the batch
    page = prepare_page(tiny_model, None, "Write a poem.", max_new_tokens=5)
    with pytest.raises(RuntimeError, match="shutting down"):
        next(runner.stream(page))  # its page is queued, then the runner is found closed
    assert not running.cancelled and len(engine.decoder) == 1
