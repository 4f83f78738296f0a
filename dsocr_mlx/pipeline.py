"""The user-facing model: prompts and tasks, vision, streaming generation, results, many pages."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import grounding, pdf
from .backends import check_dtype, get_backend
from .config import ModelArgs
from .hub import resolve_model_path
from .processing import ImageInput, ProcessedInputs, load_image, prepare_inputs
from .sampling import IMAGE_NGRAM, PDF_NGRAM, LoopDetector, Repetition, SamplingParams
from .tokenizer import EOS_TEXT, StreamingDetokenizer, Tokenizer

logger = logging.getLogger(__name__)

TASKS = {
    "markdown": "<image>\n<|grounding|>Convert the document to markdown.",
    "ocr": "<image>\n<|grounding|>OCR this image.",
    "free": "<image>\nFree OCR.",
    "figure": "<image>\nParse the figure.",
    "describe": "<image>\nDescribe this image in detail.",
    "locate": "<image>\nLocate <|ref|>{ref}<|/ref|> in the image.",
}
DEFAULT_PROMPT = TASKS["markdown"]


def build_prompt(prompt: str | None = None, task: str | None = None, ref: str | None = None) -> str:
    """The prompt text: a custom ``prompt``, or the official prompt of a named ``task``."""
    if prompt is not None and task is not None:
        raise ValueError("give either a prompt or a task, not both")
    if prompt is not None:
        return prompt
    task = task or "markdown"
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)} or pass a prompt")
    if task == "locate":
        if not ref:
            raise ValueError("the locate task needs the text to find (ref)")
        return TASKS[task].format(ref=ref)
    return TASKS[task]


@dataclass
class GenerationResponse:
    """One step of :meth:`OCRModel.stream_ocr`: a text delta and where generation stands."""

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
    page: int | None = None  # zero-based page of a PDF
    source: str | None = None
    image: Image.Image | None = field(default=None, repr=False)

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "image_tokens": self.image_tokens,
                "completion_tokens": self.generated_tokens,
                "total_tokens": self.prompt_tokens + self.generated_tokens}

    def to_dict(self) -> dict[str, Any]:
        rep = self.repetition
        return {
            "source": self.source, "page": self.page, "text": self.text, "raw_text": self.raw_text,
            "finish_reason": self.finish_reason, "retried": self.retried,
            "repetition": None if rep is None else {"period": rep.period, "repeats": rep.repeats, "start": rep.start},
            "blocks": [b.to_dict() for b in self.blocks], "usage": self.usage, "timings": self.timings,
            "image_size": None if self.image is None else list(self.image.size),
        }

    def save(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write the official artefacts: ``result.mmd``, ``result_ori.mmd``, ``result_with_boxes.jpg``,
        ``images/N.jpg`` (figure crops) and ``result.json``."""
        out = Path(out_dir)
        if (out / "result.mmd").exists() and not overwrite:
            raise FileExistsError(f"{out / 'result.mmd'} exists; pass overwrite=True to replace it")
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.mmd").write_text(self.text, encoding="utf-8")
        (out / "result_ori.mmd").write_text(self.raw_text, encoding="utf-8")
        if self.image is not None:
            grounding.draw_blocks(self.image, self.blocks).save(out / "result_with_boxes.jpg")
            grounding.save_figures(self.image, self.blocks, out / "images")
        (out / "result.json").write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
        return out


def join_pages(results: Iterable[OCRResult], raw: bool = False) -> str:
    """The official combined Markdown of a PDF: each page followed by the page separator."""
    return "".join((r.raw_text if raw else r.text) + f"\n{pdf.PAGE_SEPARATOR}\n" for r in results)


def save_pdf_results(results: list[OCRResult], out_dir: str | Path, stem: str, overwrite: bool = False) -> Path:
    """The official PDF artefacts: ``{stem}.mmd``, ``{stem}_det.mmd``, ``{stem}_layouts.pdf``, ``images/``,
    plus ``{stem}.json`` with every page's blocks and usage."""
    out = Path(out_dir)
    if (out / f"{stem}.mmd").exists() and not overwrite:
        raise FileExistsError(f"{out / (stem + '.mmd')} exists; pass overwrite=True to replace it")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.mmd").write_text(join_pages(results), encoding="utf-8")
    (out / f"{stem}_det.mmd").write_text(join_pages(results, raw=True), encoding="utf-8")
    drawn = []
    for r in results:
        if r.image is not None:
            drawn.append(grounding.draw_blocks(r.image, r.blocks))
            grounding.save_figures(r.image, r.blocks, out / "images", prefix=f"{r.page}_")
    pdf.save_images_as_pdf(drawn, out / f"{stem}_layouts.pdf")
    (out / f"{stem}.json").write_text(json.dumps([r.to_dict() for r in results], indent=1, ensure_ascii=False),
                                      encoding="utf-8")
    return out


class OCRModel:
    """DeepSeek-OCR on one backend, with the tokenizer and config it was loaded with."""

    def __init__(self, runtime: Any, tokenizer: Tokenizer, args: ModelArgs, path: Path | None = None):
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.args = args
        self.path = path
        self._vision_cache: tuple[str, Any] | None = None

    @classmethod
    def load(cls, path_or_repo_id: str | Path, backend: str = "mlx", dtype: str | None = None,
             device: str | None = None) -> OCRModel:
        dtype = check_dtype(dtype)
        module = get_backend(backend, device)
        folder = resolve_model_path(path_or_repo_id)
        args = ModelArgs.from_file(folder / "config.json")
        device = module.resolve_device(device)
        dtype = dtype or module.default_dtype(args, device)
        tokenizer = Tokenizer.from_folder(folder, args.text.bos_token_id, args.text.eos_token_id)
        start = time.perf_counter()
        runtime = module.Runtime.load(folder, args, dtype, device)
        logger.info("loaded %s (%s, %s, %s) in %.1fs", folder, runtime.name, dtype, device,
                    time.perf_counter() - start)
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

    def prepare(self, image: ImageInput | list[ImageInput] | None, prompt: str = DEFAULT_PROMPT,
                mode: str = "gundam") -> ProcessedInputs:
        """Token ids, image mask, tile grid and pixels for ``prompt`` (one ``<image>`` per image)."""
        return prepare_inputs(image, prompt, self.tokenizer, mode, self.args.image_token_id,
                              self.args.text.bos_token_id)

    def _image_embeddings(self, inputs: ProcessedInputs) -> Any:
        if inputs.global_pixels.shape[0] == 0:
            return None
        # One-entry cache: asking again about the same image (another prompt or task) skips the vision towers.
        h = hashlib.sha1()
        for a in (inputs.global_pixels, inputs.crop_pixels, inputs.images_spatial_crop):
            h.update(str(a.shape).encode())
            h.update(np.ascontiguousarray(a).tobytes())
        key = h.hexdigest()
        if self._vision_cache is None or self._vision_cache[0] != key:
            self._vision_cache = (key, self.runtime.image_embeddings(inputs))
        return self._vision_cache[1]

    def image_embeddings(self, inputs: ProcessedInputs) -> np.ndarray:
        """Float32 ``[number of <image> tokens, hidden]``: the rows scattered into the prompt."""
        emb = self._image_embeddings(inputs)
        if emb is None:
            return np.zeros((0, self.args.text.hidden_size), np.float32)
        return self.runtime.to_numpy(emb)

    def prefill_logits(self, inputs: ProcessedInputs) -> np.ndarray:
        """Float32 ``[vocab]`` logits at the last prompt position."""
        return self.runtime.prefill_logits(inputs, self._image_embeddings(inputs))

    def _attempt(self, inputs: ProcessedInputs, params: SamplingParams, max_new_tokens: int,
                 detect_loops: bool) -> Iterator[GenerationResponse]:
        detok = StreamingDetokenizer(self.tokenizer)
        detector = LoopDetector(decode=self.tokenizer.decode) if detect_loops else None
        eos = self.args.text.eos_token_id
        n_prompt = len(inputs.input_ids)
        start = time.perf_counter()
        embeddings = self._image_embeddings(inputs)
        tokens: list[int] = []
        first = None
        for token in self.runtime.generate(inputs, embeddings, max_new_tokens, params):
            now = time.perf_counter()
            first = first or now
            tokens.append(token)
            prompt_tps = n_prompt / max(first - start, 1e-9)
            gen_tps = (len(tokens) - 1) / (now - first) if len(tokens) > 1 else 0.0
            base = dict(prompt_tokens=n_prompt, image_tokens=inputs.num_image_tokens, generation_tokens=len(tokens),
                        prompt_tps=prompt_tps, generation_tps=gen_tps)
            if token == eos:
                yield GenerationResponse(detok.flush(), token, finish_reason="stop", **base)
                return
            delta = detok.add(token)
            loop = detector.check(tokens) if detector is not None else None
            if loop is not None:
                yield GenerationResponse(delta + detok.flush(), token, finish_reason="repetition", repetition=loop,
                                         **base)
                return
            if len(tokens) == max_new_tokens:
                yield GenerationResponse(delta + detok.flush(), token, finish_reason="length", **base)
                return
            yield GenerationResponse(delta, token, **base)

    def _budget(self, inputs: ProcessedInputs, max_new_tokens: int) -> int:
        context = self.args.text.max_position_embeddings
        room = context - len(inputs.input_ids)
        if room <= 0:
            raise ValueError(
                f"the prompt takes {len(inputs.input_ids)} tokens and leaves no room in the model's context of "
                f"{context}; use a smaller mode or a shorter prompt"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        return min(max_new_tokens, room)

    def stream_ocr(
        self,
        image: ImageInput | list[ImageInput] | None,
        prompt: str | None = None,
        *,
        task: str | None = None,
        ref: str | None = None,
        mode: str = "gundam",
        max_new_tokens: int = 8192,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int | None = None,
        ngram_window: int | None = None,
        detect_loops: bool = True,
        retry_on_repetition: bool = False,
        inputs: ProcessedInputs | None = None,
        _ngram_default: tuple[int, int] = IMAGE_NGRAM,
    ) -> Iterator[GenerationResponse]:
        """Stream OCR of ``image``: one :class:`GenerationResponse` per generated token.

        Args:
            image: a path, PIL image, bytes or uint8 array (or a list, one per ``<image>``).
            prompt: a custom prompt; by default the ``task`` prompt (``markdown`` unless named).
            task: ``markdown``, ``ocr``, ``free``, ``figure``, ``describe`` or ``locate`` (with ``ref``).
            mode: ``tiny``, ``small``, ``base``, ``large`` or ``gundam``.
            max_new_tokens: the most tokens to generate; the context holds 8192 with the prompt.
            temperature, top_p, top_k, seed, repetition_penalty: sampling (greedy at temperature 0).
            no_repeat_ngram_size, ngram_window: the official n-gram ban (30/90 for images); 0 turns it off.
            detect_loops: stop a degenerate repetition early with finish reason ``repetition``.
            retry_on_repetition: after a loop, emit a ``restart`` response and retry once with stronger
                anti-repetition settings.

        Yields:
            Text deltas; the last response carries ``finish_reason``.
        """
        params = SamplingParams(
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=_ngram_default[0] if no_repeat_ngram_size is None else no_repeat_ngram_size,
            ngram_window=_ngram_default[1] if ngram_window is None else ngram_window,
        )
        if inputs is None:
            inputs = self.prepare(image, build_prompt(prompt, task, ref), mode)
        budget = self._budget(inputs, max_new_tokens)
        last = None
        for last in self._attempt(inputs, params, budget, detect_loops):
            yield last
        if retry_on_repetition and last is not None and last.finish_reason == "repetition":
            logger.info("repetition loop (period %d): retrying with stronger anti-repetition", last.repetition.period)
            yield GenerationResponse("", None, last.prompt_tokens, last.image_tokens, last.generation_tokens,
                                     last.prompt_tps, last.generation_tps, restart=True, repetition=last.repetition)
            yield from self._attempt(inputs, params.stronger(), budget, detect_loops)

    def ocr(
        self,
        image: ImageInput | list[ImageInput] | None,
        prompt: str | None = None,
        *,
        task: str | None = None,
        ref: str | None = None,
        mode: str = "gundam",
        max_new_tokens: int = 8192,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int | None = None,
        ngram_window: int | None = None,
        detect_loops: bool = True,
        retry_on_repetition: bool = True,
        on_text: Callable[[str], None] | None = None,
        _page: tuple[int, str] | None = None,
    ) -> OCRResult:
        """OCR of ``image`` as one :class:`OCRResult` (a loop over :meth:`stream_ocr`; same arguments).

        ``on_text`` receives each text delta as it is generated (to show progress while waiting).
        """
        t0 = time.perf_counter()
        images = image if isinstance(image, (list, tuple)) else ([] if image is None else [image])
        pil = [load_image(im) for im in images]
        inputs = self.prepare(pil, build_prompt(prompt, task, ref), mode)
        t1 = time.perf_counter()
        tokens: list[int] = []
        finish, loop, retried, last = "length", None, False, None
        first_token = None
        for last in self.stream_ocr(
            None, inputs=inputs, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
            ngram_window=ngram_window, detect_loops=detect_loops, retry_on_repetition=retry_on_repetition,
            _ngram_default=PDF_NGRAM if _page else IMAGE_NGRAM,
        ):
            if last.restart:
                tokens, retried, loop = [], True, last.repetition
                if on_text is not None:
                    on_text("\n[repetition loop: retrying with stronger anti-repetition settings]\n")
                continue
            if on_text is not None and last.text:
                on_text(last.text)
            first_token = first_token or time.perf_counter()
            tokens.append(last.token)
            if last.finish_reason:
                finish = last.finish_reason
                loop = last.repetition or loop
        t2 = time.perf_counter()
        raw = self.tokenizer.decode(tokens)
        if raw.endswith(EOS_TEXT):
            raw = raw[: -len(EOS_TEXT)]
        raw = raw.strip()
        page, source = _page if _page else (None, None)
        original = pil[0] if pil else None
        blocks = [] if original is None else grounding.parse_blocks(raw, original.width, original.height, page or 0)
        text = grounding.clean_markdown(raw, f"{page}_" if page is not None else "", pdf_page=page is not None)
        return OCRResult(
            token_ids=tokens, raw_text=raw, text=text, finish_reason=finish,
            prompt_tokens=len(inputs.input_ids), image_tokens=inputs.num_image_tokens, blocks=blocks,
            timings={"preprocess": t1 - t0, "first_token": (first_token or t2) - t1, "total": t2 - t0,
                     "generation_tps": last.generation_tps if last else 0.0},
            repetition=loop, retried=retried, page=page, source=source, image=original,
        )

    def ocr_many(self, inputs: Iterable[str | Path | ImageInput], prompt: str | None = None, *,
                 pages: str | None = None, dpi: int = pdf.DEFAULT_DPI, **kwargs) -> Iterator[OCRResult]:
        """OCR of many images and PDFs, yielding one result per image or PDF page as each finishes.

        PDF pages use the official PDF n-gram setting (20/50) unless ``no_repeat_ngram_size`` is given.
        ``pages`` (``"1-3,7"``) selects PDF pages; ``dpi`` sets their rendering.
        """
        for item in inputs:
            if isinstance(item, (str, Path)) and pdf.is_pdf(item):
                for index, page_image in pdf.render_pages(item, pages, dpi):
                    yield self.ocr(page_image, prompt, _page=(index, str(item)), **kwargs)
            else:
                result = self.ocr(item, prompt, **kwargs)
                result.source = str(item) if isinstance(item, (str, Path)) else None
                yield result
