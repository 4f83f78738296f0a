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

    def decoder(self) -> BatchDecoder:
        """A new, empty batch of sequences decoded together (one forward per step for all of them)."""
        ...

    def to_numpy(self, x: Any) -> np.ndarray:
        """A backend array as float32 numpy."""
        ...

    def synchronize(self) -> None:
        """Wait for queued device work (so that stage timings are true)."""
        ...


@runtime_checkable
class BatchDecoder(Protocol):
    """Sequences of different prompt lengths decoded together: one forward per step for all live rows.

    Each row keeps its own sampling settings, logits processors (n-gram ban, repetition penalty) and
    random state, so a row's tokens are those it would get alone. A row joins between steps
    (:meth:`add`, which prefills it alone) and leaves between steps (:meth:`remove`) without holding
    up the others.
    """

    def add(self, inputs: ProcessedInputs, image_embeddings: Any | None, budget: int, params: SamplingParams) -> int:
        """Prefill a row and join it to the batch; returns its id. Its first token comes with the next step."""
        ...

    def remove(self, row: int) -> None:
        """Drop a row (finished or cancelled) before the next step."""
        ...

    def step(self) -> dict[int, int]:
        """One token for every live row: ``{row id: token id}``."""
        ...

    def __len__(self) -> int: ...


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
    def token_column(self, tokens: list[Any]) -> Any:
        """Per-row sampled tokens (each a backend array of one element) as one ``(B, 1)`` integer array."""
        raise NotImplementedError

    def launch(self, *arrays: Any) -> None:
        """Start computing ``arrays`` without waiting for them (MLX's lazy graphs); eager backends need not."""

    def read_tokens(self, column: Any) -> list[int]:
        """A ``(B, 1)`` token array as Python ints (waits for it)."""
        raise NotImplementedError

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
        """Token ids one by one (the caller stops on EOS); greedy with no processors by default. A batch of one."""
        decoder = self.decoder()
        row = decoder.add(inputs, image_embeddings, max_tokens, params or SamplingParams(no_repeat_ngram_size=0))
        for _ in range(max_tokens):
            yield decoder.step()[row]

    def decoder(self) -> Decoder:
        return Decoder(self)


class _Row:
    """One sequence of a :class:`Decoder`: its token ids so far, its sampler and processors, its next token."""

    def __init__(self, prompt: list[int], sampler: Any, processors: list, token: Any):
        self.tokens, self.sampler, self.processors, self.token = prompt, sampler, processors, token

    def sample(self, logits: Any) -> Any:
        for processor in self.processors:
            logits = processor(self.tokens, logits)
        return self.sampler(logits)


class Decoder:
    """:class:`BatchDecoder` over a backend's ``generation`` module (``prefill``, ``row_cache``, ``Batch``,
    ``make_sampler``, ``make_logits_processors``), written once for every backend.

    A step launches the next forward before it reads the tokens it returns, so the host's work on them
    (the n-gram ban, detokenising, stop checks) overlaps the device's (mlx-lm's decode loop): the rows'
    next tokens are sampled from those logits once their own ids are known.
    """

    def __init__(self, runtime: RuntimeBase):
        self.runtime, self.g = runtime, runtime.generation
        self.batch = self.g.Batch(runtime.model)
        self.rows: dict[int, _Row] = {}  # in batch order
        self.next_id = 0

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, inputs: ProcessedInputs, image_embeddings: Any | None, budget: int, params: SamplingParams) -> int:
        r, g = self.runtime, self.g
        with r.inference():
            embeds = r.input_embeddings(inputs, image_embeddings)
            cache = g.row_cache(r.model, embeds.shape[1] + budget)
            logits = g.prefill(r.model, embeds, cache)
            prompt = inputs.input_ids.tolist()
            sampler = g.make_sampler(params.temperature, params.top_p, params.top_k, params.seed)
            row = _Row(prompt, sampler, g.make_logits_processors(params, len(prompt)), None)
            row.token = row.sample(logits)
            r.launch(row.token)
            self.batch.add(cache)
        self.rows[self.next_id] = row
        self.next_id += 1
        return self.next_id - 1

    def remove(self, row: int) -> None:
        ids = list(self.rows)
        if row in self.rows:
            self.batch.keep([i for i, rid in enumerate(ids) if rid != row])
            del self.rows[row]

    def step(self) -> dict[int, int]:
        r, rows = self.runtime, list(self.rows.values())
        if not rows:
            return {}
        with r.inference():
            column = r.token_column([row.token for row in rows])
            logits = self.batch.logits(column)  # every row's token goes into its cache: the next forward
            r.launch(logits)
            tokens = r.read_tokens(column)
            for b, (row, token) in enumerate(zip(rows, tokens)):
                row.tokens.append(token)
                row.token = row.sample(logits[b : b + 1])
            r.launch(*[row.token for row in rows])
        return dict(zip(self.rows, tokens))
