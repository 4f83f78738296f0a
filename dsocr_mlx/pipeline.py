"""The user-facing model: prompt building, vision, prefill and greedy OCR over any backend."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends import check_dtype, get_backend
from .config import ModelArgs
from .hub import resolve_model_path
from .processing import ImageInput, ProcessedInputs, prepare_inputs
from .tokenizer import EOS_TEXT, Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "<image>\n<|grounding|>Convert the document to markdown."
GROUNDING_SPAN = re.compile(r"(<\|ref\|>(.*?)<\|/ref\|><\|det\|>(.*?)<\|/det\|>)", re.DOTALL)


def clean_markdown(raw: str) -> str:
    """The official post-processing: figure spans become image links, other grounding spans go."""
    text = raw
    spans = GROUNDING_SPAN.findall(raw)
    figures = [s[0] for s in spans if "<|ref|>image<|/ref|>" in s[0]]
    others = [s[0] for s in spans if "<|ref|>image<|/ref|>" not in s[0]]
    for i, span in enumerate(figures):
        text = text.replace(span, f"![](images/{i}.jpg)\n")
    for span in others:
        text = text.replace(span, "").replace("\\coloneqq", ":=").replace("\\eqqcolon", "=:")
    return text


@dataclass
class OCRResult:
    """The outcome of one OCR call."""

    token_ids: list[int]
    raw_text: str
    text: str
    finish_reason: str  # "stop" (EOS) or "length"
    prompt_tokens: int
    image_tokens: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)


class OCRModel:
    """DeepSeek-OCR on one backend, with the tokenizer and config it was loaded with."""

    def __init__(self, runtime: Any, tokenizer: Tokenizer, args: ModelArgs, path: Path | None = None):
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.args = args
        self.path = path
        self._vision_cache: tuple[str, Any] | None = None

    @classmethod
    def load(cls, path_or_repo_id: str | Path, backend: str = "mlx", dtype: str = "float16") -> OCRModel:
        check_dtype(dtype)
        module = get_backend(backend)
        folder = resolve_model_path(path_or_repo_id)
        args = ModelArgs.from_file(folder / "config.json")
        tokenizer = Tokenizer.from_folder(folder, args.text.bos_token_id, args.text.eos_token_id)
        start = time.perf_counter()
        runtime = module.Runtime.load(folder, args, dtype)
        logger.info("loaded %s (%s, %s) in %.1fs", folder, backend, dtype, time.perf_counter() - start)
        return cls(runtime, tokenizer, args, folder)

    @property
    def backend(self) -> str:
        return self.runtime.name

    @property
    def dtype(self) -> str:
        return self.runtime.dtype

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

    def ocr(self, image: ImageInput | list[ImageInput] | None, prompt: str = DEFAULT_PROMPT, mode: str = "gundam",
            max_new_tokens: int = 8192, temperature: float = 0.0) -> OCRResult:
        """Run OCR on ``image`` with ``prompt`` and return the decoded result (greedy decoding).

        Args:
            image: a path, PIL image, bytes or uint8 array (or a list, one per ``<image>``).
            prompt: the prompt; the default converts a document to Markdown with layout spans.
            mode: ``tiny``, ``small``, ``base``, ``large`` or ``gundam``.
            max_new_tokens: the most tokens to generate (the context holds 8192 in all).
            temperature: 0 for greedy decoding (the only choice in this version).
        """
        if temperature != 0.0:
            raise ValueError("only greedy decoding (temperature=0) is available in this version")
        t0 = time.perf_counter()
        inputs = self.prepare(image, prompt, mode)
        t1 = time.perf_counter()
        room = self.args.text.max_position_embeddings - len(inputs.input_ids)
        if room <= 0:
            raise ValueError(
                f"the prompt takes {len(inputs.input_ids)} tokens and leaves no room in the model's context of "
                f"{self.args.text.max_position_embeddings}; use a smaller mode or a shorter prompt"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        embeddings = self._image_embeddings(inputs)
        t2 = time.perf_counter()
        ids: list[int] = []
        finish = "length"
        first = None
        for token in self.runtime.generate(inputs, embeddings, min(max_new_tokens, room)):
            first = first or time.perf_counter()
            ids.append(token)
            if token == self.args.text.eos_token_id:
                finish = "stop"
                break
        t3 = time.perf_counter()
        raw = self.tokenizer.decode(ids)
        if raw.endswith(EOS_TEXT):
            raw = raw[: -len(EOS_TEXT)]
        raw = raw.strip()
        return OCRResult(
            token_ids=ids,
            raw_text=raw,
            text=clean_markdown(raw),
            finish_reason=finish,
            prompt_tokens=len(inputs.input_ids),
            image_tokens=inputs.num_image_tokens,
            timings={"preprocess": t1 - t0, "vision": t2 - t1, "first_token": (first or t3) - t2,
                     "generate": t3 - t2},
        )
