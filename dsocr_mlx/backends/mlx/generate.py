"""Token generation in MLX: chunked prefill into the KV cache, then one decode step per token."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx

from ...sampling import SamplingParams, banned_ngram_tokens
from .cache import KVCache
from .model import Model

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[list[int], mx.array], mx.array]


def greedy(logits: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1)


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> Sampler:
    """Greedy at temperature 0; otherwise temperature sampling after optional top-k and top-p filtering."""
    if temperature == 0:
        return greedy
    key = [mx.random.key(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))]

    def sample(logits: mx.array) -> mx.array:
        logits = logits / temperature
        if top_k and top_k < logits.shape[-1]:
            kth = mx.sort(logits, axis=-1)[..., -top_k][..., None]
            logits = mx.where(logits < kth, -mx.inf, logits)
        if top_p < 1.0:
            order = mx.argsort(-logits, axis=-1)
            sorted_logits = mx.take_along_axis(logits, order, axis=-1)
            probs = mx.softmax(sorted_logits, axis=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = (mx.cumsum(probs, axis=-1) - probs) >= top_p
            sorted_logits = mx.where(drop, -mx.inf, sorted_logits)
            logits = mx.put_along_axis(logits, order, sorted_logits, axis=-1)
        key[0], step = mx.random.split(key[0])
        return mx.random.categorical(logits, key=step)

    return sample


def make_logits_processors(params: SamplingParams, prompt_length: int) -> list[LogitsProcessor]:
    """The repetition penalty and the no-repeat n-gram ban, over the generated tokens only.

    The official scripts run the ban as a vLLM logits processor, which sees the generated ids only.
    """
    processors: list[LogitsProcessor] = []
    if params.repetition_penalty != 1.0:
        penalty = params.repetition_penalty

        def repetition(tokens: list[int], logits: mx.array) -> mx.array:
            seen = sorted(set(tokens[prompt_length:]))
            if not seen:
                return logits
            idx = mx.array(seen)
            picked = logits[..., idx]
            logits[..., idx] = mx.where(picked > 0, picked / penalty, picked * penalty)
            return logits

        processors.append(repetition)
    if params.no_repeat_ngram_size > 0:

        def no_repeat_ngram(tokens: list[int], logits: mx.array) -> mx.array:
            banned = banned_ngram_tokens(
                tokens[prompt_length:], params.no_repeat_ngram_size, params.ngram_window, params.ngram_whitelist
            )
            if banned:
                logits[..., mx.array(sorted(banned))] = -mx.inf
            return logits

        processors.append(no_repeat_ngram)
    return processors


def prefill(model: Model, input_embeddings: mx.array, cache: list, step_size: int = 512) -> mx.array:
    """Run the prompt through the decoder in chunks; returns float32 logits at the last position."""
    L = input_embeddings.shape[1]
    start = 0
    while L - start > step_size:
        model.model(None, cache, input_embeddings[:, start : start + step_size])
        mx.eval([c.state for c in cache])
        start += step_size
    hidden = model.model(None, cache, input_embeddings[:, start:])
    return model.lm_head(hidden[:, -1, :]).astype(mx.float32)


def row_cache(model: Model, length: int) -> list[KVCache]:
    """A fresh cache for one row's prefill (it grows as needed: ``length`` is a hint)."""
    return model.make_cache()


class Batch:
    """The rows decoding together: each joins with its own prefilled cache, in one batch cache per layer."""

    def __init__(self, model: Model):
        self.model = model
        self.cache = model.make_batch_cache()

    def add(self, cache: list[KVCache]) -> None:
        for layer, row in zip(self.cache, cache):
            layer.add(row)

    def keep(self, rows: list[int]) -> None:
        for layer in self.cache:
            layer.keep(rows)

    def logits(self, tokens: mx.array) -> mx.array:
        """Float32 logits ``(B, V)`` after each row's token ``(B, 1)``, written into the caches."""
        return self.model(tokens, self.cache)[:, -1, :].astype(mx.float32)


def generate_step(
    prompt: Sequence[int],
    model: Model,
    *,
    input_embeddings: mx.array,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    prefill_step_size: int = 512,
) -> Iterator[tuple[int, mx.array]]:
    """Yield ``(token, logits)`` per generated token; the caller decides when to stop.

    The plain one-sequence loop (a batch of one, each token read before the next step is built): the
    reference the pipelined :class:`~dsocr_mlx.backends.runtime.Decoder` is held to.

    Args:
        prompt: the prompt token ids (the processors see prompt + generated ids, like HF).
        model: the MLX model.
        input_embeddings: ``(1, L, D)`` prompt embeddings with the image rows scattered in.
        max_tokens: the most tokens to generate.
        sampler: maps float32 logits ``(1, V)`` to a token id; greedy when None.
        logits_processors: callables ``(token_ids, logits) -> logits`` applied in order.
        prefill_step_size: prompt positions per prefill chunk.

    Yields:
        The token id and the float32 logits it was chosen from (after the processors).
    """
    sampler = sampler or greedy
    tokens = [int(t) for t in prompt]
    cache = model.make_cache()
    logits = prefill(model, input_embeddings, cache, prefill_step_size)
    batch = Batch(model)
    batch.add(cache)
    for n in range(max_tokens):
        for processor in logits_processors:
            logits = processor(tokens, logits)
        token = int(sampler(logits).item())
        tokens.append(token)
        yield token, logits
        if n + 1 < max_tokens:
            logits = batch.logits(mx.array([[token]]))
