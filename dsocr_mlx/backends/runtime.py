"""The backend contract: what the backend-neutral pipeline calls, and what is the same in every backend.

A backend is a package (``backends/mlx``, ``backends/torch``) whose modules mirror each other file for
file. Its ``__init__`` provides :class:`Backend`: ``resolve_device``, ``default_dtype`` and a ``Runtime``
class satisfying :class:`Runtime`. Most runtimes subclass :class:`RuntimeBase`, which writes once the
steps that only differ in tensor types, and leaves each backend four small hooks.

The pipeline sees arrays only as numpy (inputs in, logits and embeddings out) and image embeddings as
an opaque handle that it passes back; it never reaches into the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from ..config import ModelArgs
from ..processing import ProcessedInputs
from ..sampling import SamplingParams


@runtime_checkable
class Runtime(Protocol):
    """A loaded model on one backend, as the pipeline drives it."""

    name: str  # "mlx" or "torch"
    dtype: str  # "float32", "float16" or "bfloat16"
    device: str  # "gpu"/"cpu" (MLX) or "cpu"/"cuda:N" (PyTorch)

    def image_embeddings(self, inputs: ProcessedInputs) -> Any | None:
        """The vision towers' output for the images of ``inputs`` (None without images), evaluated."""
        ...

    def prefill_logits(self, inputs: ProcessedInputs, image_embeddings: Any | None) -> np.ndarray:
        """Float32 ``[vocab]`` logits at the last prompt position."""
        ...

    def generate(
        self,
        inputs: ProcessedInputs,
        image_embeddings: Any | None,
        max_tokens: int,
        params: SamplingParams | None = None,
    ) -> Iterator[int]:
        """Token ids one by one, at most ``max_tokens``; the caller stops on EOS and closes the iterator."""
        ...

    def to_numpy(self, x: Any) -> np.ndarray:
        """A backend array as float32 numpy."""
        ...

    def synchronize(self) -> None:
        """Wait for queued device work (so that stage timings are true)."""
        ...


class Backend(Protocol):
    """What a backend package exports."""

    Runtime: type

    def resolve_device(self, device: str | None) -> str: ...

    def default_dtype(self, args: ModelArgs, device: str) -> str: ...


class RuntimeBase:
    """The steps every backend runs the same way, over four hooks.

    Subclasses set ``name`` and ``generation`` (their ``generate`` module: ``make_sampler``,
    ``make_logits_processors``, ``prefill``, ``generate_step``) and implement :meth:`pixels`,
    :meth:`token_ids`, :meth:`evaluate` and :meth:`to_numpy`; their model provides ``encode_images``,
    ``get_input_embeddings`` and ``make_cache``.
    """

    name: ClassVar[str]
    generation: ClassVar[ModuleType]

    def __init__(self, model: Any, dtype: str, device: str):
        self.model = model
        self.dtype = dtype
        self.device = device

    @classmethod
    def load(cls, folder: str | Path, args: ModelArgs, dtype: str, device: str | None = None) -> RuntimeBase:
        raise NotImplementedError

    # Hooks.
    def pixels(self, array: np.ndarray) -> Any:
        """NCHW float32 numpy pixels as the vision towers' input (layout, dtype, device)."""
        raise NotImplementedError

    def token_ids(self, ids: np.ndarray) -> Any:
        """``[1, L]`` token ids as the backend's integer array."""
        raise NotImplementedError

    def evaluate(self, x: Any) -> Any:
        """Force a lazily built result (MLX); eager backends return it as is."""
        return x

    def to_numpy(self, x: Any) -> np.ndarray:
        raise NotImplementedError

    def synchronize(self) -> None:
        pass

    def inference(self) -> contextlib.AbstractContextManager:
        """The context the model runs in (no autograd on PyTorch)."""
        return contextlib.nullcontext()

    # Shared steps.
    def image_embeddings(self, inputs: ProcessedInputs) -> Any | None:
        if inputs.global_pixels.shape[0] == 0:
            return None
        with self.inference():
            crops = self.pixels(inputs.crop_pixels) if inputs.crop_pixels.shape[0] else None
            out = self.model.encode_images(self.pixels(inputs.global_pixels), crops, inputs.images_spatial_crop)
            return self.evaluate(out)

    def input_embeddings(self, inputs: ProcessedInputs, image_embeddings: Any | None) -> Any:
        with self.inference():
            ids = self.token_ids(inputs.input_ids[None])
            return self.model.get_input_embeddings(ids, image_embeddings, inputs.images_seq_mask)

    def prefill_logits(self, inputs: ProcessedInputs, image_embeddings: Any | None) -> np.ndarray:
        with self.inference():
            embeds = self.input_embeddings(inputs, image_embeddings)
            logits = self.generation.prefill(self.model, embeds, self.model.make_cache())
            return self.to_numpy(logits[0])

    def generate(
        self,
        inputs: ProcessedInputs,
        image_embeddings: Any | None,
        max_tokens: int,
        params: SamplingParams | None = None,
    ) -> Iterator[int]:
        """Token ids one by one (the caller stops on EOS); greedy with no processors by default."""
        params = params or SamplingParams(no_repeat_ngram_size=0)
        embeds = self.input_embeddings(inputs, image_embeddings)
        prompt = inputs.input_ids.tolist()
        g = self.generation
        sampler = g.make_sampler(params.temperature, params.top_p, params.top_k, params.seed)
        processors = g.make_logits_processors(params, len(prompt))
        for token, _ in g.generate_step(
            prompt,
            self.model,
            input_embeddings=embeds,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=processors,
        ):
            yield token
