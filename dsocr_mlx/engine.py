"""The one generation loop: pages read together in a batch that they join and leave between decode steps.

:class:`BatchEngine` takes pages (an image or a PDF page, with its options), runs their vision towers
(several views in one call), prefills each one alone, and decodes all of them together through the
backend's :class:`~dsocr_mlx.backends.runtime.BatchDecoder`: one forward per step for every live row. Each
page keeps its own :class:`~dsocr_mlx.pipeline.Decoding` (detokeniser, stop strings, loop detection, client
text), so what a page gives does not depend on its neighbours. ``OCRModel.stream_ocr`` is this engine with
one page; ``ocr_many(batch_size=N)`` and the server run it with many.
"""

from __future__ import annotations

import contextlib
import contextvars
import queue
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from . import grounding, textstream
from .options import OCROptions
from .processing import ImageInput, ProcessedInputs, load_image

if TYPE_CHECKING:
    from .pipeline import Decoding, GenerationResponse, OCRModel, OCRResult

# The most views (global views and tiles) run through the vision towers in one call: their activations
# are alive together (SAM's banded global attention keeps each view's peak under 1 GB).
VISION_VIEWS = 8


def _as_list(image: ImageInput | list[ImageInput] | None) -> list[ImageInput]:
    return list(image) if isinstance(image, (list, tuple)) else ([] if image is None else [image])


def default_batch_size(model: OCRModel) -> int:
    """Pages that decode together by default: 8 on Apple's GPU and on a CPU, 16 on CUDA.

    Decoding is bound by reading the weights, so rows sharing a step are almost free until compute or
    memory catches up: each row holds its KV cache (up to 0.5 GB in float16 at the full 8192-token
    context, 1 GB in float32). On a 2-core CPU 8 rows decode 3.1x as fast as one and 16 rows 4.1x to 4.6x
    (README, "Batched decoding"); 16 rows' worst case would double the cache beside the weights.
    """
    device = str(model.device)
    if device.startswith("cuda"):
        return 16
    return 8


class Page:
    """One image or PDF page in the engine: its inputs and options, then its decoding, then its result."""

    def __init__(
        self,
        images: list[Any],
        inputs: ProcessedInputs,
        options: OCROptions,
        budget: int,
        page: int | None,
        source: str | None,
        started: float,
        prepared: float,
    ):
        self.images, self.inputs, self.options, self.budget = images, inputs, options, budget
        self.page, self.source = page, source
        self.params = options.sampling_params(pdf_page=page is not None)
        self.embeddings: Any = None
        self.vision_s = 0.0
        self.seq: Decoding | None = None
        self.first_attempt: Decoding | None = None
        self.row: int | None = None
        self.retried, self.loop = False, None
        self.cancelled = False
        self.result: OCRResult | None = None
        self.times = {"start": started, "prepared": prepared}

    @property
    def done(self) -> bool:
        return self.result is not None or self.cancelled


class BatchEngine:
    """Pages decoded together: at most ``max_batch`` rows at a time, the rest waiting their turn.

    Call :meth:`submit` (on any thread: it only preprocesses) and :meth:`step` (on the thread that owns the
    model) until the pages are done; each step returns the responses it produced, a page's last one
    carrying its :class:`~dsocr_mlx.pipeline.OCRResult`.
    """

    def __init__(self, model: OCRModel, max_batch: int = 1):
        if max_batch < 1:
            raise ValueError(f"the batch size must be at least 1, not {max_batch}")
        self.model, self.max_batch = model, max_batch
        self.decoder = model.runtime.decoder()
        self.waiting: deque[Page] = deque()
        self.active: dict[int, Page] = {}

    def __len__(self) -> int:
        """Pages admitted or waiting."""
        return len(self.waiting) + len(self.active)

    def submit(
        self,
        image: ImageInput | list[ImageInput] | None,
        prompt: str | None = None,
        options: OCROptions | None = None,
        *,
        inputs: ProcessedInputs | None = None,
        page: int | None = None,
        source: str | None = None,
        **overrides: Any,
    ) -> Page:
        """Queue one image (or PDF page, ``page`` zero-based) with its options; returns its :class:`Page`.

        Raises:
            OptionError, ValueError: bad options or an unreadable image, before anything is queued.
        """
        item = prepare_page(self.model, image, prompt, options, inputs=inputs, page=page, source=source, **overrides)
        self.add(item)
        return item

    def add(self, page: Page) -> None:
        """Queue a page made by :func:`prepare_page` (its preprocessing may run on another thread)."""
        self.waiting.append(page)

    def cancel(self, page: Page) -> None:
        """Stop a page (its client left): it leaves the batch before the next step."""
        page.cancelled = True
        if page.row is not None and page.row in self.active:
            self.decoder.remove(page.row)
            del self.active[page.row]
        if page in self.waiting:
            self.waiting.remove(page)

    def step(self) -> list[tuple[Page, GenerationResponse | Exception]]:
        """Admit waiting pages while there is room, then decode one token for every live row.

        Returns each page's new response; a page whose vision, prefill or result failed gets the
        exception instead (it leaves, the others go on).
        """
        admitted = []
        while self.waiting and len(self.active) + len(admitted) < self.max_batch:
            admitted.append(self.waiting.popleft())
        out: list[tuple[Page, GenerationResponse | Exception]] = []
        try:
            self._vision([p for p in admitted if p.embeddings is None])
        except Exception:  # noqa: BLE001 - then one page per call, so that only the failing one fails
            for p in [p for p in admitted if p.embeddings is None]:
                try:
                    self._vision([p])
                except Exception as e:  # noqa: BLE001 - reported to that page's owner
                    p.cancelled = True
                    out.append((p, e))
            admitted = [p for p in admitted if not p.cancelled]
        for p in admitted:
            try:
                self._start(p)
            except Exception as e:  # noqa: BLE001 - reported to that page's owner
                p.cancelled = True
                out.append((p, e))
        for row, token in self.decoder.step().items():
            p = self.active[row]
            try:
                response = p.seq.add(token)
                if response.finish_reason is not None:
                    self.decoder.remove(row)
                    del self.active[row]
                    response = self._finish(p, response)
            except Exception as e:  # noqa: BLE001 - that page's own text or result failed: the others go on
                self.cancel(p)
                response = e
            out.append((p, response))
        return out

    def _vision(self, pages: list[Page]) -> None:
        """The vision towers for ``pages``, several views per call (those with images of one size)."""
        model, runtime = self.model, self.model.runtime
        group: list[Page] = []

        def flush() -> None:
            if not group:
                return
            start = time.perf_counter()
            if len(group) == 1:
                group[0].embeddings = model.vision_embeddings(group[0].inputs)
            else:
                merged = runtime.image_embeddings(_merged([p.inputs for p in group]))
                counts = np.cumsum([0] + [p.inputs.num_image_tokens for p in group])
                for p, a, b in zip(group, counts[:-1], counts[1:]):
                    p.embeddings = merged[int(a) : int(b)]
            runtime.synchronize()
            for p in group:
                p.vision_s = (time.perf_counter() - start) / len(group)
            group.clear()

        for p in pages:
            if not p.inputs.global_pixels.shape[0]:
                continue  # no image: nothing to encode
            views = p.inputs.global_pixels.shape[0] + p.inputs.crop_pixels.shape[0]
            if group and (
                _view_shape(group[0].inputs) != _view_shape(p.inputs) or _views(group) + views > VISION_VIEWS
            ):
                flush()
            group.append(p)
        flush()

    def _start(self, p: Page) -> None:
        from .pipeline import Decoding

        model = self.model
        p.seq = Decoding(
            model.tokenizer,
            p.options,
            model.args.text.eos_token_id,
            p.budget,
            len(p.inputs.input_ids),
            p.inputs.num_image_tokens,
            p.page,
        )
        p.row = self.decoder.add(p.inputs, p.embeddings, p.budget, p.params)
        self.active[p.row] = p

    def _finish(self, p: Page, response: GenerationResponse) -> GenerationResponse:
        """A page's last response (with its result), or a ``restart`` one when it retries after a loop."""
        from .pipeline import OCRResult, logger

        p.first_attempt = p.first_attempt or p.seq
        if response.finish_reason == "repetition" and p.options.retry_on_repetition and not p.retried:
            logger.info(
                "repetition loop (period %d): retrying with stronger anti-repetition", response.repetition.period
            )
            p.loop, p.retried, p.params = response.repetition, True, p.params.stronger()
            self.waiting.appendleft(p)  # prefilled again at the next step, its image embeddings kept
            return replace(response, text="", output="", finish_reason=None, restart=True)
        t3 = time.perf_counter()
        seq, tokenizer = p.seq, self.model.tokenizer
        raw = seq.raw_text(tokenizer)
        original = p.images[0] if p.images else None
        blocks = [] if original is None else grounding.parse_blocks(raw, original.width, original.height, p.page or 0)
        result = OCRResult(
            token_ids=seq.tokens,
            raw_text=raw,
            text=textstream.markdown(raw, p.page),
            finish_reason=response.finish_reason,
            prompt_tokens=len(p.inputs.input_ids),
            image_tokens=p.inputs.num_image_tokens,
            blocks=blocks,
            repetition=response.repetition or p.loop,
            retried=p.retried,
            page=p.page,
            source=p.source,
            image=original,
        )
        tail = seq.stream.finish(result.output_text(p.options.output))
        t4 = time.perf_counter()
        first = p.first_attempt
        result.timings = {
            "preprocess": p.times["prepared"] - p.times["start"],
            "vision": p.vision_s,
            "prefill": (first.first or t3) - first.start,
            "first_token": (first.first or t3) - first.start + p.vision_s,
            "generation_tps": response.generation_tps,
            "postprocess": t4 - t3,
            "total": t4 - p.times["start"],
        }
        p.result = result
        return replace(response, output=response.output + tail, result=result)


def prepare_page(
    model: OCRModel,
    image: ImageInput | list[ImageInput] | None,
    prompt: str | None = None,
    options: OCROptions | None = None,
    *,
    inputs: ProcessedInputs | None = None,
    page: int | None = None,
    source: str | None = None,
    **overrides: Any,
) -> Page:
    """A page's options checked and its inputs prepared (numpy and the tokenizer only: any thread may run it).

    Raises:
        OptionError, ValueError: bad options, an unreadable image, a prompt longer than the context.
    """
    started = time.perf_counter()
    options = model.check_options((options or OCROptions()).merged(prompt=prompt, **overrides))
    images = [load_image(im) for im in _as_list(image)]
    if inputs is None:
        inputs = model.prepare(images, options.prompt_text, options.mode)
    budget = model.budget(inputs, options.max_new_tokens)
    return Page(images, inputs, options, budget, page, source, started, time.perf_counter())


def _view_shape(inputs: ProcessedInputs) -> tuple:
    return inputs.global_pixels.shape[1:], inputs.crop_pixels.shape[1:]


def _views(pages: list[Page]) -> int:
    return sum(p.inputs.global_pixels.shape[0] + p.inputs.crop_pixels.shape[0] for p in pages)


def _merged(inputs: list[ProcessedInputs]) -> ProcessedInputs:
    """Several pages' images as one input to the vision towers (their prompts play no part there)."""
    return replace(
        inputs[0],
        images_spatial_crop=np.concatenate([i.images_spatial_crop for i in inputs]),
        global_pixels=np.concatenate([i.global_pixels for i in inputs]),
        crop_pixels=np.concatenate([i.crop_pixels for i in inputs]),
    )


_bound: contextvars.ContextVar[BatchRunner | None] = contextvars.ContextVar("dsocr_batch_runner", default=None)
_check: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("dsocr_batch_check", default=None)


def bound_runner() -> BatchRunner | None:
    """The runner whose batch this thread's pages join (see :meth:`BatchRunner.bound`), or None."""
    return _bound.get()


class BatchRunner:
    """A :class:`BatchEngine` stepped by the thread that owns the model, fed by other threads.

    A thread that reads pages for it runs inside :meth:`bound`: there ``OCRModel.stream_ocr`` (and so
    ``ocr`` and ``ocr_many``) hands each page to :meth:`stream`, the page joins the one batch, and the
    thread gets its own page's responses. The owner thread calls :meth:`pump` in its loop; the model
    (MLX streams are thread-local) is only ever used there.
    """

    def __init__(self, engine: BatchEngine, wake: Callable[[], None] | None = None):
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sinks: dict[int, Callable[[Any], None]] = {}
        self.wake = wake or (lambda: None)
        self.steps = 0
        self.widest = 0  # the most rows one step decoded together
        self.closed: Exception | None = None

    @contextlib.contextmanager
    def bound(self, check: Callable[[], None] | None = None) -> Iterator[None]:
        """Within this block, the calling thread's pages join this runner's batch; ``check`` is called at
        each of their tokens and stops the page when it raises (its job was cancelled or timed out)."""
        token, checking = _bound.set(self), _check.set(check)
        try:
            yield
        finally:
            _check.reset(checking)
            _bound.reset(token)

    def stream(self, page: Page) -> Iterator[GenerationResponse]:
        """Queue ``page`` and yield its responses as the owner thread produces them (any thread)."""
        responses: queue.SimpleQueue = queue.SimpleQueue()
        check = _check.get()
        if self.closed is not None:
            raise self.closed
        self.inbox.put(("add", page, responses.put))
        self.wake()
        if self.closed is not None:  # closed meanwhile: the owner may never take the page
            self._refuse(self.closed)  # (the batch itself is the owner's: never touched from here)
        try:
            while True:
                item = responses.get()
                if isinstance(item, Exception):
                    raise item
                if check is not None:  # whatever the reader does with the tokens (it may show none)
                    check()
                yield item
                if item.result is not None:
                    return
        finally:
            if not page.done:  # the reader stopped early (its client left): the page leaves the batch
                self.inbox.put(("cancel", page, None))
                self.wake()

    def pump(self) -> bool:
        """Take the pages that arrived or left, then one step if any page is in the batch (owner thread).

        Returns whether a step ran.
        """
        while True:
            try:
                kind, page, sink = self.inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self.sinks[id(page)] = sink
                self.engine.add(page)
            else:
                self.sinks.pop(id(page), None)
                self.engine.cancel(page)
        if not len(self.engine):
            return False
        self.widest = max(self.widest, min(len(self.engine), self.engine.max_batch))
        self.steps += 1
        for page, response in self.engine.step():
            sink = self.sinks.get(id(page))
            if sink is None:
                continue
            if isinstance(response, Exception) or response.result is not None:
                del self.sinks[id(page)]
            sink(response)
        return True

    def close(self, error: Exception) -> None:
        """Stop for good: every page in or on its way to the batch, and every later one, gets ``error``."""
        self.closed = error
        self._refuse(error)
        self.fail_all(error)

    def _refuse(self, error: Exception) -> None:
        """Give the pages on their way in ``error`` (any thread)."""
        while True:
            try:
                kind, page, sink = self.inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                sink(error)

    def fail_all(self, error: Exception) -> None:
        """Give every page in the batch ``error`` and empty it (a step failed for all of them)."""
        for page in [*self.engine.waiting, *self.engine.active.values()]:
            self.engine.cancel(page)
            sink = self.sinks.pop(id(page), None)
            if sink is not None:
                sink(error)
