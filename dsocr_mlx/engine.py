"""The one generation loop: pages read together in a batch that they join and leave between decode steps.

:class:`BatchEngine` takes pages (an image or a PDF page, with its options), runs their vision towers
(several views in one call), prefills each one alone, and decodes all of them together through the
backend's :class:`~dsocr_mlx.backends.runtime.BatchDecoder`: one forward per step for every live row. Each
page keeps its own :class:`~dsocr_mlx.pipeline.Decoding` (detokeniser, stop strings, loop detection, client
text), so what a page gives does not depend on its neighbours. ``OCRModel.stream_ocr`` is this engine with
one page; ``ocr_many(batch_size=N)`` and the server run it with many.
"""

from __future__ import annotations

import time
from collections import deque
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
        started = time.perf_counter()
        model = self.model
        options = model.check_options((options or OCROptions()).merged(prompt=prompt, **overrides))
        images = [load_image(im) for im in _as_list(image)]
        if inputs is None:
            inputs = model.prepare(images, options.prompt_text, options.mode)
        budget = model.budget(inputs, options.max_new_tokens)
        item = Page(images, inputs, options, budget, page, source, started, time.perf_counter())
        self.waiting.append(item)
        return item

    def cancel(self, page: Page) -> None:
        """Stop a page (its client left): it leaves the batch before the next step."""
        page.cancelled = True
        if page.row is not None and page.row in self.active:
            self.decoder.remove(page.row)
            del self.active[page.row]
        if page in self.waiting:
            self.waiting.remove(page)

    def step(self) -> list[tuple[Page, GenerationResponse]]:
        """Admit waiting pages while there is room, then decode one token for every live row."""
        admitted = []
        while self.waiting and len(self.active) + len(admitted) < self.max_batch:
            admitted.append(self.waiting.popleft())
        self._vision([p for p in admitted if p.embeddings is None])
        for p in admitted:
            self._start(p)
        out: list[tuple[Page, GenerationResponse]] = []
        for row, token in self.decoder.step().items():
            p = self.active[row]
            response = p.seq.add(token)
            if response.finish_reason is None:
                out.append((p, response))
                continue
            self.decoder.remove(row)
            del self.active[row]
            out.append((p, self._finish(p, response)))
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
