"""What the precision and quantization benchmarks share: one golden case run through the public API, and the
two ways its numbers are compared with a reference run."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def run_case(model, golden: Path, case: dict, tokens: int) -> tuple[np.ndarray, list[int]]:
    """The prefill logits at the last prompt position and ``tokens`` greedy tokens (no n-gram ban, no loop
    detection) of one golden case."""
    image = golden / case["image"]
    logits = model.prefill_logits(model.prepare(image, case["prompt"], mode=case["mode"]))
    ids = model.ocr(
        image, case["prompt"], mode=case["mode"], max_new_tokens=tokens, no_repeat_ngram_size=0, detect_loops=False
    ).token_ids
    return logits, ids


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(p || q) of the softmax distributions of two logit vectors."""
    p = p_logits.astype(np.float64) - p_logits.max()
    q = q_logits.astype(np.float64) - q_logits.max()
    logp = p - np.log(np.exp(p).sum())
    logq = q - np.log(np.exp(q).sum())
    return float((np.exp(logp) * (logp - logq)).sum())


def agreement(tokens: list[int], reference: list[int]) -> tuple[int, int]:
    """(tokens equal before the first difference, tokens equal at the same position in all)."""
    prefix = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    return prefix, sum(a == b for a, b in zip(tokens, reference))
