"""Token generation in MLX: chunked prefill into the KV cache, then one decode step per token."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx

from .model import Model

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[list[int], mx.array], mx.array]


def greedy(logits: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1)


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
    for n in range(max_tokens):
        for processor in logits_processors:
            logits = processor(tokens, logits)
        token = int(sampler(logits).item())
        tokens.append(token)
        yield token, logits
        if n + 1 < max_tokens:
            logits = model(mx.array([[token]]), cache)[:, -1, :].astype(mx.float32)
