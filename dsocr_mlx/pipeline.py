"""The user-facing model: prompts and tasks, vision, streaming generation, results, many pages."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import grounding, pdf, textstream
from .backends import Runtime, check_dtype, get_backend
from .config import ModelArgs
from .files import staged_files
from .hub import resolve_model_path
from .modes import family_mode
from .options import DEFAULT_PROMPT, TASKS, OCROptions, build_prompt
from .processing import ImageInput, ProcessedInputs, prepare_inputs
from .sampling import LoopDetector, Repetition
from .tokenizer import EOS_TEXT, StreamingDetokenizer, Tokenizer

__all__ = [
    "DEFAULT_PROMPT",
    "TASKS",
    "GenerationResponse",
    "OCRModel",
    "OCROptions",
    "OCRResult",
    "build_prompt",
    "join_pages",
    "save_pdf_results",
]

logger = logging.getLogger(__name__)
RETRY_NOTE = "\n[repetition loop: retrying with stronger anti-repetition settings]\n"


def _as_list(image: ImageInput | list[ImageInput] | None) -> list[ImageInput]:
    return list(image) if isinstance(image, (list, tuple)) else ([] if image is None else [image])


@dataclass
class GenerationResponse:
    """One step of :meth:`OCRModel.stream_ocr`: text deltas and where generation stands.

    ``text`` is the raw model text of this token; ``output`` the new part of the client text (the
    ``output`` form of the options: Markdown by default), often empty while it is held back. The
    ``output`` deltas of a page add up to its final text; the last response carries the :class:`OCRResult`.
    """

    text: str
    token: int | None
    prompt_tokens: int
    image_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    finish_reason: str | None = None  # "stop", "length" or "repetition" on the last response
    restart: bool = False  # the text so far is discarded: a retry with stronger anti-repetition follows
    repetition: Repetition | None = None
    output: str = ""
    result: OCRResult | None = None  # the finished page, on the last response


@dataclass
class OCRResult:
    """The outcome of OCR on one image or PDF page."""

    token_ids: list[int]
    raw_text: str
    text: str
    finish_reason: str
    prompt_tokens: int
    image_tokens: int
    blocks: list[grounding.Block] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    repetition: Repetition | None = None  # the loop that stopped the first attempt, if any
    retried: bool = False
    page: int | None = None  # zero-based page of a PDF (the JSON's "page_index"; its "page" counts from 1)
    source: str | None = None
    image: Image.Image | None = field(default=None, repr=False)

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "image_tokens": self.image_tokens,
            "completion_tokens": self.generated_tokens,
            "total_tokens": self.prompt_tokens + self.generated_tokens,
        }

    def output_text(self, output: str = "markdown") -> str:
        """The text a client gets in the ``output`` form: ``markdown``, ``raw`` or ``json``."""
        return textstream.final_text(self.raw_text, output, self.page, self.blocks)

    def to_dict(self) -> dict[str, Any]:
        rep = self.repetition
        return {
            "source": self.source,
            # "page" counts from 1 as --pages does; "page_index" is the zero-based index of the official
            # figure names (images/{page_index}_N.jpg). Both are null for an image.
            "page": None if self.page is None else self.page + 1,
            "page_index": self.page,
            "text": self.text,
            "raw_text": self.raw_text,
            "finish_reason": self.finish_reason,
            "retried": self.retried,
            "repetition": None if rep is None else {"period": rep.period, "repeats": rep.repeats, "start": rep.start},
            "blocks": [b.to_dict() for b in self.blocks],
            "usage": self.usage,
            "timings": self.timings,
            "image_size": None if self.image is None else list(self.image.size),
        }

    def save(self, out_dir: str | Path, overwrite: bool = False, searchable: bool = False) -> Path:
        """Write the official artefacts: ``result.mmd``, ``result_ori.mmd``, ``result_with_boxes.jpg``,
        ``images/N.jpg`` (figure crops) and ``result.json``; with ``searchable`` also ``result_searchable.pdf``
        (the image with an invisible text layer, :func:`dsocr_mlx.pdf.save_searchable_pdf`).

        They are written aside and moved into ``out_dir`` when all are complete, ``result.mmd`` last:
        an interrupted save leaves no ``result.mmd``, so the folder never looks finished.
        """
        out = Path(out_dir)
        if (out / "result.mmd").exists() and not overwrite:
            raise FileExistsError(f"{out / 'result.mmd'} exists; pass overwrite=True to replace it")
        with staged_files(out, last="result.mmd") as staged:
            (staged / "result.mmd").write_text(self.text, encoding="utf-8")
            (staged / "result_ori.mmd").write_text(self.raw_text, encoding="utf-8")
            if self.image is not None:
                grounding.draw_blocks(self.image, self.blocks).save(staged / "result_with_boxes.jpg")
                grounding.save_figures(self.image, self.blocks, staged / "images")
                if searchable:
                    pdf.save_searchable_pdf([self], staged / "result_searchable.pdf")
            (staged / "result.json").write_text(
                json.dumps(self.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8"
            )
        return out


def join_pages(results: Iterable[OCRResult], raw: bool = False, output: str | None = None) -> str:
    """The official combined Markdown of a PDF: each page followed by the page separator (``raw``: the
    raw texts; ``output``: each page in that output form, as a server client gets it)."""
    form = output or ("raw" if raw else "markdown")
    return "".join(r.output_text(form) + f"\n{pdf.PAGE_SEPARATOR}\n" for r in results)


def save_pdf_results(
    results: list[OCRResult], out_dir: str | Path, stem: str, overwrite: bool = False, searchable: bool = False
) -> Path:
    """The official PDF artefacts: ``{stem}.mmd``, ``{stem}_det.mmd``, ``{stem}_layouts.pdf``, ``images/``,
    plus ``{stem}.json`` with every page's blocks and usage, and with ``searchable`` ``{stem}_searchable.pdf``
    (:func:`dsocr_mlx.pdf.save_searchable_pdf`); written aside, ``{stem}.mmd`` moved in last."""
    out = Path(out_dir)
    if (out / f"{stem}.mmd").exists() and not overwrite:
        raise FileExistsError(f"{out / (stem + '.mmd')} exists; pass overwrite=True to replace it")
    with staged_files(out, last=f"{stem}.mmd") as staged:
        (staged / f"{stem}.mmd").write_text(join_pages(results), encoding="utf-8")
        (staged / f"{stem}_det.mmd").write_text(join_pages(results, raw=True), encoding="utf-8")
        drawn = []
        for r in results:
            if r.image is not None:
                drawn.append(grounding.draw_blocks(r.image, r.blocks))
                grounding.save_figures(r.image, r.blocks, staged / "images", prefix=f"{r.page}_")
        pdf.save_images_as_pdf(drawn, staged / f"{stem}_layouts.pdf")
        if searchable and drawn:
            pdf.save_searchable_pdf(results, staged / f"{stem}_searchable.pdf")
        (staged / f"{stem}.json").write_text(
            json.dumps([r.to_dict() for r in results], indent=1, ensure_ascii=False), encoding="utf-8"
        )
    return out


class Decoding:
    """One sequence's decoding: token ids in, :class:`GenerationResponse` out.

    Holds everything that is per sequence (detokenizer, stop strings, loop detector, client text):
    :meth:`OCRModel.stream_ocr` drives one, and a batched decoder can drive one per row.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        options: OCROptions,
        eos_token_id: int,
        budget: int,
        prompt_tokens: int,
        image_tokens: int,
        page: int | None = None,
    ):
        self.options, self.eos, self.budget, self.page = options, eos_token_id, budget, page
        self.detok = StreamingDetokenizer(tokenizer)
        self.detector = LoopDetector(decode=tokenizer.decode) if options.detect_loops else None
        self.stream = textstream.TextStream(options.output, page, options.stop)
        self.tokens: list[int] = []
        self.raw = ""  # the raw text so far, cut before a stop string once one is found
        self.stopped = False
        self.counts = dict(prompt_tokens=prompt_tokens, image_tokens=image_tokens)
        self.start = time.perf_counter()
        self.first: float | None = None

    def add(self, token: int) -> GenerationResponse:
        """The response for the next generated token; it has a ``finish_reason`` when the sequence ends."""
        now = time.perf_counter()
        self.first = self.first or now
        self.tokens.append(token)
        finish, loop = None, None
        if token == self.eos and not self.options.ignore_eos:
            delta, finish = self.detok.flush(), "stop"
        else:
            delta = self.detok.add(token)
            loop = self.detector.check(self.tokens) if self.detector is not None else None
            if loop is not None:
                finish = "repetition"
            elif len(self.tokens) >= self.budget:
                finish = "length"
            if finish:
                delta += self.detok.flush()
        self._append(delta)
        if self.stopped:
            finish = "stop"
        n = len(self.tokens)
        prompt_tps = self.counts["prompt_tokens"] / max(self.first - self.start, 1e-9)
        generation_tps = (n - 1) / (now - self.first) if n > 1 else 0.0
        return GenerationResponse(
            delta,
            token,
            generation_tokens=n,
            prompt_tps=prompt_tps,
            generation_tps=generation_tps,
            finish_reason=finish,
            repetition=loop,
            output=self.stream.feed(self.raw),
            **self.counts,
        )

    def _append(self, delta: str) -> None:
        stops = self.options.stop
        if self.stopped:
            return
        if not stops:
            self.raw += delta
            return
        start = max(0, len(self.raw) - max(len(s) for s in stops) + 1)
        self.raw += delta
        hits = [i for i in (self.raw.find(s, start) for s in stops) if i >= 0]
        if hits:
            self.raw, self.stopped = self.raw[: min(hits)], True

    def raw_text(self, tokenizer: Tokenizer) -> str:
        """The finished raw text: decoded whole (end-of-text mark dropped), cut at a stop string, stripped."""
        if self.stopped:
            return self.raw.strip()
        raw = tokenizer.decode(self.tokens)
        if raw.endswith(EOS_TEXT):
            raw = raw[: -len(EOS_TEXT)]
        return raw.strip()


class OCRModel:
    """DeepSeek-OCR or DeepSeek-OCR-2 on one backend, with the tokenizer and config it was loaded with."""

    def __init__(self, runtime: Runtime, tokenizer: Tokenizer, args: ModelArgs, path: Path | None = None):
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.args = args
        self.path = path
        self._vision_cache: tuple[str, Any] | None = None

    @classmethod
    def load(
        cls,
        path_or_repo_id: str | Path,
        backend: str = "mlx",
        dtype: str | None = None,
        device: str | None = None,
        options: OCROptions | None = None,
    ) -> OCRModel:
        dtype = check_dtype(dtype)
        module = get_backend(backend, device)
        folder = resolve_model_path(path_or_repo_id)
        args = ModelArgs.from_file(folder / "config.json")
        if options is not None:
            options.check_family(args.family)  # before the weights load: a wrong mode fails at once
        device = module.resolve_device(device)
        dtype = dtype or module.default_dtype(args, device)
        tokenizer = Tokenizer.from_folder(folder, args.text.bos_token_id, args.text.eos_token_id)
        start = time.perf_counter()
        runtime = module.Runtime.load(folder, args, dtype, device)
        logger.info("loaded %s (%s, %s, %s) in %.1fs", folder, runtime.name, dtype, device, time.perf_counter() - start)
        return cls(runtime, tokenizer, args, folder)

    @property
    def backend(self) -> str:
        return self.runtime.name

    @property
    def dtype(self) -> str:
        return self.runtime.dtype

    @property
    def device(self) -> str:
        return self.runtime.device

    @property
    def family(self) -> str:
        """``deepseek-ocr`` or ``deepseek-ocr-2``, as read from config.json."""
        return self.args.family

    def check_options(self, options: OCROptions) -> OCROptions:
        """``options`` if they apply to this model; else :class:`OptionError` (a mode of the other family)."""
        return options.check_family(self.family)

    def prepare(
        self, image: ImageInput | list[ImageInput] | None, prompt: str = DEFAULT_PROMPT, mode: str | None = None
    ) -> ProcessedInputs:
        """Token ids, image mask, tile grid and pixels for ``prompt`` (one ``<image>`` per image).

        ``mode`` is one of this model's modes (None: the official one, ``gundam`` for DeepSeek-OCR and
        ``default`` for DeepSeek-OCR-2).
        """
        return prepare_inputs(
            image,
            prompt,
            self.tokenizer,
            family_mode(self.family, mode),
            self.args.image_token_id,
            self.args.text.bos_token_id,
        )

    def vision_embeddings(self, inputs: ProcessedInputs) -> Any:
        """The vision towers' output for ``inputs`` as the backend holds it (a one-entry cache by pixels)."""
        if inputs.global_pixels.shape[0] == 0:
            return None
        # One-entry cache: asking again about the same image (another prompt or task) skips the vision towers.
        h = hashlib.sha1()
        for a in (inputs.global_pixels, inputs.crop_pixels, inputs.images_spatial_crop):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        key = h.hexdigest()
        if self._vision_cache is None or self._vision_cache[0] != key:
            self._vision_cache = None  # release the old embeddings before computing new ones
            self._vision_cache = (key, self.runtime.image_embeddings(inputs))
        return self._vision_cache[1]

    def clear_vision_cache(self) -> None:
        """Forget the last image's embeddings (the next request runs the vision towers again)."""
        self._vision_cache = None

    def image_embeddings(self, inputs: ProcessedInputs) -> np.ndarray:
        """Float32 ``[number of <image> tokens, hidden]``: the rows scattered into the prompt."""
        emb = self.vision_embeddings(inputs)
        if emb is None:
            return np.zeros((0, self.args.text.hidden_size), np.float32)
        return self.runtime.to_numpy(emb)

    def prefill_logits(self, inputs: ProcessedInputs) -> np.ndarray:
        """Float32 ``[vocab]`` logits at the last prompt position."""
        return self.runtime.prefill_logits(inputs, self.vision_embeddings(inputs))

    def budget(self, inputs: ProcessedInputs, max_new_tokens: int) -> int:
        """The tokens a prompt may generate: ``max_new_tokens``, or less where the context ends."""
        context = self.args.text.max_position_embeddings
        room = context - len(inputs.input_ids)
        if room <= 0:
            raise ValueError(
                f"the prompt takes {len(inputs.input_ids)} tokens and leaves no room in the model's context of "
                f"{context}; use a smaller mode or a shorter prompt"
            )
        return min(max_new_tokens, room)

    def stream_ocr(
        self,
        image: ImageInput | list[ImageInput] | None,
        prompt: str | None = None,
        options: OCROptions | None = None,
        *,
        inputs: ProcessedInputs | None = None,
        page: int | None = None,
        source: str | None = None,
        **overrides: Any,
    ) -> Iterator[GenerationResponse]:
        """Stream OCR of ``image``: one :class:`GenerationResponse` per generated token.

        This is the one generation loop: :meth:`ocr`, :meth:`ocr_many`, the CLI, the server and the
        benchmark all run it, so they give the same text for the same input and options.

        Args:
            image: a path, PIL image, bytes or uint8 array (or a list, one per ``<image>``).
            prompt: a custom prompt; by default the task's official prompt.
            options: the :class:`OCROptions` (default: the built-in defaults); ``overrides`` are option
                names and values applied over them (``task="free"``, ``mode="base"``, ...).
            inputs: prepared inputs (from :meth:`prepare`) instead of ``image``.
            page: the zero-based page of a PDF: the official PDF n-gram ban, figure names and clean-up.
            source: recorded in the result (the file the image came from).

        Yields:
            Text deltas (``text`` raw, ``output`` the client text); the last response carries
            ``finish_reason`` and ``result``. After a loop with ``retry_on_repetition`` a ``restart``
            response says the text so far is discarded, and the retry follows.
        """
        from .engine import BatchEngine, bound_runner, prepare_page

        item = prepare_page(self, image, prompt, options, inputs=inputs, page=page, source=source, **overrides)
        runner = bound_runner()
        if runner is not None:  # another thread steps the batch this page joins (a server's worker)
            yield from runner.stream(item)
            return
        engine = BatchEngine(self)
        engine.add(item)
        while not item.done:
            for _, response in engine.step():
                if isinstance(response, Exception):
                    raise response
                yield response

    def ocr(
        self,
        image: ImageInput | list[ImageInput] | None,
        prompt: str | None = None,
        options: OCROptions | None = None,
        *,
        on_text: Callable[[str], None] | None = None,
        **overrides: Any,
    ) -> OCRResult:
        """OCR of ``image`` as one :class:`OCRResult`: a loop over :meth:`stream_ocr` (same arguments).

        ``on_text`` receives the client text as it is generated (to show progress while waiting).
        """
        result = None
        for response in self.stream_ocr(image, prompt, options, **overrides):
            if on_text is not None and response.restart:
                on_text(RETRY_NOTE)
            elif on_text is not None and response.output:
                on_text(response.output)
            result = response.result or result
        assert result is not None, "stream_ocr ends with a result"
        return result

    def ocr_many(
        self,
        inputs: Iterable[str | Path | ImageInput],
        prompt: str | None = None,
        options: OCROptions | None = None,
        *,
        pages: str | None = None,
        on_text: Callable[[str], None] | None = None,
        batch_size: int = 1,
        **overrides: Any,
    ) -> Iterator[OCRResult]:
        """OCR of many images and PDFs, yielding one result per image or PDF page, in input order.

        PDF pages are rendered at the options' ``dpi`` and use the official PDF rules (the 20/50 n-gram
        ban unless ``no_repeat_ngram_size`` is given, per-page figure names, blank-line collapse).
        ``pages`` (``"1-3,7"``) selects PDF pages. With ``batch_size`` N, up to N pages decode together
        (one forward per step for all of them); at most N pages are read ahead, so memory stays bounded by
        N pages' pixels plus N rows of context (see README, "Batched decoding"). ``on_text`` gets the text
        of the earliest unfinished page as it is generated, and a later page's as soon as it is the earliest.
        """
        from .engine import BatchEngine, bound_runner

        options = self.check_options((options or OCROptions()).merged(prompt=prompt, **overrides))
        sources = self._pages(inputs, pages, options.dpi)
        if bound_runner() is not None:  # pages join a shared batch one by one (its owner batches them)
            for image, index, source in sources:
                yield self.ocr(image, options=options, page=index, source=source, on_text=on_text)
            return
        engine = BatchEngine(self, batch_size)
        order: deque = deque()  # submitted pages in input order, with the text held back for each
        exhausted = False
        while order or not exhausted:
            while not exhausted and len(order) < batch_size:
                item = next(sources, None)
                if item is None:
                    exhausted = True
                    break
                image, index, source = item
                order.append([engine.submit(image, options=options, page=index, source=source), []])
            for page, response in engine.step():
                if isinstance(response, Exception):
                    raise response
                held = next(h for p, h in order if p is page)
                text = RETRY_NOTE if response.restart else response.output
                if on_text is not None and text:
                    (on_text(text) if page is order[0][0] else held.append(text))
            while order and order[0][0].result is not None:
                yield order.popleft()[0].result
                if order and on_text is not None and order[0][1]:
                    on_text("".join(order[0][1]))
                    order[0][1].clear()

    @staticmethod
    def _pages(inputs: Iterable[str | Path | ImageInput], pages: str | None, dpi: int) -> Iterator[tuple]:
        """``(image, PDF page index or None, source)`` for every image and selected PDF page, lazily."""
        for item in inputs:
            if isinstance(item, (str, Path)) and pdf.is_pdf(item):
                for index, page_image in pdf.render_pages(item, pages, dpi):
                    yield page_image, index, str(item)
            else:
                yield item, None, str(item) if isinstance(item, (str, Path)) else None
