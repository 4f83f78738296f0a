"""One golden case of the official code (../shared/golden or ../shared/golden2) checked through the public API.

Each case runs its vision towers once, its prefill once through ``prefill_logits`` and once inside ``ocr``.
The checks that only localise a failure (SAM and CLIP / Qwen2-encoder outputs, the hidden state after
each decoder layer, the MoE routing) run when a public number is off, and their findings join the
failure message: a passing case costs no more than the public API.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import tolerances as tol


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def rle_expand(rle) -> np.ndarray:
    return np.concatenate([np.full(int(n), bool(v)) for v, n in rle])


def to_numpy(x) -> np.ndarray:
    return x.float().cpu().numpy() if hasattr(x, "cpu") else np.array(x)


def no_grad(model):
    if model.backend == "torch":
        import torch

        return torch.inference_mode()
    return contextlib.nullcontext()


def decoder_trace(model, inputs, image_embeddings):
    """Hidden state at the last prompt position after each layer and the final norm, plus MoE routing."""
    runtime = model.runtime
    hidden, routing = [], {}
    with no_grad(model):
        h = runtime.input_embeddings(inputs, image_embeddings)
        for i, layer in enumerate(runtime.model.model.layers):
            a = h + layer.self_attn(layer.input_layernorm(h), "causal", None)
            x = layer.post_attention_layernorm(a)
            if hasattr(layer.mlp, "gate"):
                routing[i] = np.sort(to_numpy(layer.mlp.gate(x)[0][0]), axis=-1)
            h = a + layer.mlp(x)
            hidden.append(to_numpy(h[0, -1]))
        hidden.append(to_numpy(runtime.model.model.norm(h)[0, -1]))
    return np.stack(hidden), routing


def _differs(name: str, ours: np.ndarray, want: np.ndarray) -> str | None:
    if ours.shape != want.shape:
        return f"{name}: shape {ours.shape} vs {want.shape}"
    r, m = rel_l2(ours, want), float(np.abs(ours - want).max())
    if r < tol.GOLDEN_EMB_REL_L2 and m < tol.GOLDEN_EMB_MAX_ABS:
        return None
    return f"{name}: rel-L2 {r:.2e}, max |d| {m:.2e}"


def tower_report(model, inputs, npz) -> str:
    """Where the vision towers first depart from the official ones: SAM, then CLIP or the Qwen2 encoder,
    for the global view and (DeepSeek-OCR-2) the first tile."""
    runtime, inner = model.runtime, model.runtime.model.model
    views = [("global", inputs.global_pixels)]
    if "sam_out_tile0" in npz:
        views.append(("tile0", inputs.crop_pixels[:1]))
    found = []
    for view, pixels in views:
        with no_grad(model):
            sam = inner.sam_model(runtime.pixels(pixels))  # (B, g, g, C) on both backends
            second = inner.qwen2_model(sam) if model.family == "deepseek-ocr-2" else inner.vision_model(sam)
            second, sam = to_numpy(second), to_numpy(sam).transpose(0, 3, 1, 2)  # the reference's NCHW
        other = "qwen2" if model.family == "deepseek-ocr-2" else "clip"
        for name, ours in (("sam", sam), (other, second)):
            key = f"{name}_out_{view}"
            if key in npz:
                found.append(_differs(f"{name} {view}", ours, npz[key]) or f"{name} {view} agrees")
    return "; ".join(found)


def decoder_report(model, inputs, npz) -> str:
    """The decoder layer where the last position's hidden state first departs, and the routing."""
    hidden, routing = decoder_trace(model, inputs, model.vision_embeddings(inputs))
    gaps = np.abs(hidden - npz["decoder_last_pos_hidden"]).max(axis=1)
    found = [f"hidden max |d| per layer {np.array2string(gaps, precision=2)}"]
    for layer, experts in routing.items():
        want = npz[f"moe_layer{layer}_topk_idx_sorted"].astype(np.int64)
        clear = npz[f"moe_layer{layer}_gap_kth_vs_next"] > tol.GOLDEN_ROUTING_GAP
        wrong = int((experts[clear] != want[clear]).any(axis=1).sum())
        found.append(f"layer {layer}: {wrong} of {int(clear.sum())} clear tokens routed differently")
    return "; ".join(found)


def check_case(model: Any, golden_dir: Path, case: dict) -> tuple[Any, Any]:
    """Hold ``model`` to one golden case (inputs, pixels, embeddings, logits, 32 greedy tokens).

    Returns the case's prepared inputs and vision embeddings, for :func:`check_batch`."""
    npz = np.load(golden_dir / "cases" / f"{case['id']}.npz")
    image = golden_dir / case["image"]

    inputs = model.prepare(image, case["prompt"], mode=case["mode"])
    assert inputs.input_ids.tolist() == case["input_ids"]
    assert np.array_equal(inputs.images_seq_mask, rle_expand(case["images_seq_mask_rle"]))
    assert inputs.images_spatial_crop.tolist() == case["images_spatial_crop"]
    assert np.array_equal(inputs.global_pixels[0, :, ::16, ::16], npz["global_view_sub16"])
    assert inputs.crop_pixels.shape[0] == case["n_crop_tiles"]
    if "crops_sub16" in npz:
        assert np.array_equal(inputs.crop_pixels[:, :, ::16, ::16], npz["crops_sub16"])

    emb = model.image_embeddings(inputs)
    assert emb.shape == (case["n_image_tokens"], model.args.text.hidden_size)
    fixed = emb[npz["img_emb_fixed_rows_idx"]]
    problems = [
        _differs("row norms", np.linalg.norm(emb, axis=1), npz["img_emb_row_norm"]),
        _differs("fixed rows", fixed, npz["img_emb_fixed_rows"]),
        _differs("all rows", emb, npz["img_emb_full"]) if "img_emb_full" in npz else None,
    ]
    if any(problems):
        pytest.fail(
            f"image embeddings: {'; '.join(p for p in problems if p)}. Towers: {tower_report(model, inputs, npz)}"
        )

    logits, want = model.prefill_logits(inputs), npz["prefill_last_logits"]
    top_ok = np.argsort(-logits)[:10].tolist() == np.argsort(-want)[:10].tolist()
    big = float(np.abs(logits - want).max())
    if big >= tol.GOLDEN_LOGITS_MAX_ABS or rel_l2(logits, want) >= tol.GOLDEN_LOGITS_REL_L2 or not top_ok:
        pytest.fail(
            f"prefill logits: max |d| {big:.3g}, rel-L2 {rel_l2(logits, want):.2e}, top-10 equal {top_ok}. "
            f"Decoder: {decoder_report(model, inputs, npz)}"
        )

    result = model.ocr(image, prompt=case["prompt"], mode=case["mode"], max_new_tokens=32)
    assert result.token_ids == case["greedy"]["generated_ids"], decoder_report(model, inputs, npz)
    assert result.prompt_tokens == case["n_tokens"] and result.image_tokens == case["n_image_tokens"]
    return inputs, model.vision_embeddings(inputs)  # the one-entry cache still holds this image's


def check_batch(model: Any, cases: list[dict], prepared: list[tuple[Any, Any]]) -> None:
    """The cases' prompts (different lengths, modes and tile counts) decoding together in one batch, rows
    joining one step apart: every row's greedy tokens are the official ones, as when decoded alone."""
    from dsocr_mlx import OCROptions

    assert len({len(inputs.input_ids) for inputs, _ in prepared}) > 1, "the rows should differ in length"
    decoder = model.runtime.decoder()
    want, got = {}, {}
    for case, (inputs, embeddings) in zip(cases, prepared):
        expected = case["greedy"]["generated_ids"]
        params = OCROptions(mode=case["mode"]).sampling_params()
        row = decoder.add(inputs, embeddings, len(expected), params)
        want[row], got[row] = expected, []
        for r, token in decoder.step().items():  # the next row joins a batch already decoding
            got[r].append(token)
            if len(got[r]) == len(want[r]):
                decoder.remove(r)
    while len(decoder):
        for r, token in decoder.step().items():
            got[r].append(token)
            if len(got[r]) == len(want[r]):
                decoder.remove(r)
    wrong = [c["id"] for c, r in zip(cases, want) if got[r] != want[r]]
    assert not wrong, f"cases whose tokens differ in a batch: {wrong}"
