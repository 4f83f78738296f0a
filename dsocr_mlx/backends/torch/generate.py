"""Token generation in PyTorch: chunked prefill into the KV cache, then one decode step per token."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch

from ...sampling import SamplingParams, banned_ngram_tokens
from .cache import BatchKVCache, FixedShapeView, KVCache
from .model import Model

Sampler = Callable[[torch.Tensor], torch.Tensor]
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return torch.argmax(logits, dim=-1)


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> Sampler:
    """Greedy at temperature 0; otherwise temperature sampling after optional top-k and top-p filtering."""
    if temperature == 0:
        return greedy
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))

    def sample(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float() / temperature
        if top_k and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = (probs.cumsum(dim=-1) - probs) >= top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(dim=-1).cpu()
        return torch.multinomial(probs, 1, generator=generator)[..., 0]

    return sample


def make_logits_processors(params: SamplingParams, prompt_length: int) -> list[LogitsProcessor]:
    """The repetition penalty and the no-repeat n-gram ban, over the generated tokens only.

    The official scripts run the ban as a vLLM logits processor, which sees the generated ids only.
    """
    processors: list[LogitsProcessor] = []
    if params.repetition_penalty != 1.0:
        penalty = params.repetition_penalty

        def repetition(tokens: list[int], logits: torch.Tensor) -> torch.Tensor:
            seen = sorted(set(tokens[prompt_length:]))
            if not seen:
                return logits
            idx = torch.tensor(seen, device=logits.device)
            picked = logits[..., idx]
            logits[..., idx] = torch.where(picked > 0, picked / penalty, picked * penalty)
            return logits

        processors.append(repetition)
    if params.no_repeat_ngram_size > 0:

        def no_repeat_ngram(tokens: list[int], logits: torch.Tensor) -> torch.Tensor:
            banned = banned_ngram_tokens(
                tokens[prompt_length:], params.no_repeat_ngram_size, params.ngram_window, params.ngram_whitelist
            )
            if banned:
                logits[..., torch.tensor(sorted(banned), device=logits.device)] = float("-inf")
            return logits

        processors.append(no_repeat_ngram)
    return processors


def prefill(model: Model, input_embeddings: torch.Tensor, cache: list, step_size: int = 512) -> torch.Tensor:
    """Run the prompt through the decoder in chunks; returns float32 logits at the last position."""
    L = input_embeddings.shape[1]
    start = 0
    while L - start > step_size:
        model.model(None, cache, input_embeddings[:, start : start + step_size])
        start += step_size
    hidden = model.model(None, cache, input_embeddings[:, start:])
    return model.lm_head(hidden[:, -1, :]).float()


def cuda_graphs_enabled(device: torch.device, max_tokens: int) -> bool:
    """Decode through a CUDA graph on CUDA devices, unless ``DSOCR_CUDA_GRAPHS=0`` or the run is too short to
    repay the capture (about five eager steps: two warm-ups, the capture and two checked replays)."""
    return device.type == "cuda" and max_tokens > 8 and os.environ.get("DSOCR_CUDA_GRAPHS", "1") != "0"


class DecodeStep:
    """One decode step at fixed shapes over the preallocated cache, replayed as a CUDA graph when captured.

    At batch 1 a step launches several hundred small kernels; replaying them as one graph removes the
    per-kernel launch cost that otherwise bounds decode speed on a GPU. The token and position are device
    tensors written before each replay, the keys and values go into the cache's buffers in place, and the
    logits come back in a buffer owned by the graph. Uncaptured (``capture=False``) it runs the same
    fixed-shape step eagerly, which is how it is tested without a GPU.
    """

    warmup_steps = 2  # eager runs on a side stream before capture, as the CUDA graph docs advise
    checked_replays = 2  # the first replays are compared with the eager step, at two different positions

    def __init__(self, model: Model, cache: list[KVCache], capture: bool):
        device = model.lm_head.weight.device
        self.model = model
        self.cache = cache
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros((1,), dtype=torch.long, device=device)
        self.views = [FixedShapeView(c, self.position) for c in cache]
        self.capture = capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.checks_left = self.checked_replays
        self._kept: tuple[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def run(self) -> torch.Tensor:
        return self.model(self.token, self.views)[:, -1, :].float()

    def __call__(self, token: int | torch.Tensor) -> torch.Tensor:
        """The float32 logits ``(1, V)`` after ``token`` (an int or a device tensor, read without a host
        sync), written at the cache's next position."""
        position = self.cache[0].offset
        if position >= self.cache[0].keys.shape[2]:
            raise ValueError(f"the KV cache holds {self.cache[0].keys.shape[2]} positions and is full")
        if isinstance(token, torch.Tensor):
            self.token.copy_(token.reshape(1, 1))
        else:
            self.token.fill_(token)
        self.position.fill_(position)
        if self.capture:
            self._capture()
        if self.graph is None:
            logits = self.run()
        else:
            self.graph.replay()
            logits = self.logits.clone()
            if self.checks_left:
                logits = self._check(logits)
        for c in self.cache:
            c.offset += 1
        return logits

    def _capture(self) -> None:
        """Warm up on a side stream, then capture the step; on any failure the eager step stays."""
        self.capture = False
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(self.warmup_steps):  # each rewrites the same keys and values at this position
                    self.run()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.logits = self.run()
            self.graph = graph
        except Exception as e:  # capture failed: the eager step computes the same thing
            warnings.warn(f"CUDA graph capture of the decode step failed ({e}); decoding eagerly", stacklevel=3)
            self.graph, self.logits = None, None

    def _check(self, replayed: torch.Tensor) -> torch.Tensor:
        """Compare a replay with the eager step at the same position; eager from then on if they differ.

        A host value captured as a constant by mistake shows at the second position at the latest. Such a
        replay may have written its keys and values at the capture position instead of this one: that
        position's entries are kept from the first (matching) check and put back; the eager step then
        rewrites this position's.
        """
        self.checks_left -= 1
        eager = self.run()
        position = int(self.cache[0].offset)
        if (replayed - eager).abs().max() <= 1e-2 * eager.abs().max():
            if self.checks_left:
                self._kept = (
                    position,
                    [(c.keys[..., position, :].clone(), c.values[..., position, :].clone()) for c in self.cache],
                )
            return replayed
        warnings.warn("the CUDA graph of the decode step disagrees with the eager step; decoding eagerly", stacklevel=3)
        if self._kept is not None:
            kept_position, entries = self._kept
            for c, (k, v) in zip(self.cache, entries):
                c.keys[..., kept_position, :] = k
                c.values[..., kept_position, :] = v
            eager = self.run()
        self.graph, self.logits, self._kept = None, None, None
        return eager


def row_cache(model: Model, length: int) -> list[KVCache]:
    """One row's cache, preallocated for its prompt and budget (``length``): no reallocation while decoding,
    and fixed buffers for a CUDA graph."""
    return model.make_cache(max_length=length)


class Batch:
    """The rows decoding together: each joins with its own prefilled cache, in one batch cache per layer.

    A row decoding alone keeps its own preallocated cache and, on CUDA, a :class:`DecodeStep` replayed as a
    CUDA graph (where a step's launch cost bounds the speed); a second row joining moves both into the
    batch caches and decoding goes on eagerly.
    """

    def __init__(self, model: Model, cuda_graph: bool | None = None):
        self.model, self.cuda_graph = model, cuda_graph
        self.alone: list[KVCache] | None = None
        self.decode: DecodeStep | None = None
        self.cache: list[BatchKVCache] | None = None

    def add(self, cache: list[KVCache]) -> None:
        if self.alone is None and self.cache is None:
            self.alone = cache
            return
        if self.alone is not None:
            self.cache, alone = self.model.make_batch_cache(), self.alone
            self.alone, self.decode = None, None
            self.add_to_batch(alone)
        self.add_to_batch(cache)

    def add_to_batch(self, cache: list[KVCache]) -> None:
        for layer, row in zip(self.cache, cache):
            layer.add(row)

    def keep(self, rows: list[int]) -> None:
        if self.alone is not None:
            if rows != [0]:
                self.alone, self.decode = None, None
            return
        for layer in self.cache or []:
            layer.keep(rows)
        if not rows:
            self.cache = None

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``(B, V)`` after each row's token ``(B, 1)``, written into the caches."""
        if self.alone is None:
            return self.model(tokens, self.cache)[:, -1, :].float()
        if self.decode is None and self._use_graph():
            device = self.model.lm_head.weight.device
            self.decode = DecodeStep(self.model, self.alone, capture=device.type == "cuda")
        if self.decode is not None:
            return self.decode(tokens)
        return self.model(tokens, self.alone)[:, -1, :].float()

    def _use_graph(self) -> bool:
        if self.cuda_graph is not None:
            return self.cuda_graph
        first = self.alone[0]
        room = (first.max_length or 0) - first.offset
        return cuda_graphs_enabled(self.model.lm_head.weight.device, room)


@torch.inference_mode()
def generate_step(
    prompt: Sequence[int],
    model: Model,
    *,
    input_embeddings: torch.Tensor,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    prefill_step_size: int = 512,
    cuda_graph: bool | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(token, logits)`` per generated token; the caller decides when to stop.

    The plain one-sequence loop (a batch of one, each token read before the next step is built): the
    reference the pipelined :class:`~dsocr_mlx.backends.runtime.Decoder` is held to.

    Args:
        prompt: the prompt token ids (the processors see prompt + generated ids, like HF).
        model: the torch model.
        input_embeddings: ``(1, L, D)`` prompt embeddings with the image rows scattered in.
        max_tokens: the most tokens to generate.
        sampler: maps float32 logits ``(1, V)`` to a token id; greedy when None.
        logits_processors: callables ``(token_ids, logits) -> logits`` applied in order.
        prefill_step_size: prompt positions per prefill chunk.
        cuda_graph: decode through a captured CUDA graph (``DecodeStep``); by default on CUDA devices for runs
            of more than 8 tokens, unless ``DSOCR_CUDA_GRAPHS=0``. True on the CPU runs the same fixed-shape
            step eagerly.

    Yields:
        The token id and the float32 logits it was chosen from (after the processors).
    """
    sampler = sampler or greedy
    tokens = [int(t) for t in prompt]
    cache = row_cache(model, input_embeddings.shape[1] + max_tokens)
    device = input_embeddings.device
    logits = prefill(model, input_embeddings, cache, prefill_step_size)
    batch = Batch(model, cuda_graph)
    batch.add(cache)
    for n in range(max_tokens):
        for processor in logits_processors:
            logits = processor(tokens, logits)
        token = int(sampler(logits).item())
        tokens.append(token)
        yield token, logits
        if n + 1 < max_tokens:
            logits = batch.logits(torch.tensor([[token]], device=device))
