"""The golden cases of the official code (../shared/golden) reproduced in float32 through the public API."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests import tolerances as tol

pytestmark = pytest.mark.slow


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def rle_expand(rle) -> np.ndarray:
    return np.concatenate([np.full(int(n), bool(v)) for v, n in rle])


def load_cases(golden_dir):
    return json.loads((golden_dir / "cases.json").read_text())


CASE_IDS = ["p01", "p02", "p03", "p04", "p05", "p06"]


@pytest.fixture(scope="module", params=["mlx", "torch"])
def golden_model(request, golden_ckpt):
    """The golden checkpoint in float32 on each backend (one loaded at a time)."""
    pytest.importorskip("mlx.core" if request.param == "mlx" else "torch")
    import dsocr_mlx

    model = dsocr_mlx.load(str(golden_ckpt), backend=request.param, dtype="float32")
    yield model
    del model


def to_numpy(x) -> np.ndarray:
    return x.float().cpu().numpy() if hasattr(x, "cpu") else np.array(x)


def no_grad(model):
    import contextlib

    if model.backend == "torch":
        import torch

        return torch.inference_mode()
    return contextlib.nullcontext()


@pytest.fixture(scope="module")
def cases(golden_dir):
    return {c["id"]: c for c in load_cases(golden_dir)}


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


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_golden_case(golden_model, golden_dir, cases, case_id):
    case = cases[case_id]
    npz = np.load(golden_dir / "cases" / f"{case_id}.npz")
    image = golden_dir / case["image"]

    inputs = golden_model.prepare(image, case["prompt"], mode=case["mode"])
    assert inputs.input_ids.tolist() == case["input_ids"]
    assert np.array_equal(inputs.images_seq_mask, rle_expand(case["images_seq_mask_rle"]))
    assert inputs.images_spatial_crop.tolist() == case["images_spatial_crop"]
    assert np.array_equal(inputs.global_pixels[0, :, ::16, ::16], npz["global_view_sub16"])

    emb = golden_model.image_embeddings(inputs)
    assert emb.shape == (case["n_image_tokens"], 1280)
    norms = np.linalg.norm(emb, axis=1)
    assert rel_l2(norms, npz["img_emb_row_norm"]) < tol.GOLDEN_EMB_REL_L2
    fixed = emb[npz["img_emb_fixed_rows_idx"]]
    assert rel_l2(fixed, npz["img_emb_fixed_rows"]) < tol.GOLDEN_EMB_REL_L2
    assert np.abs(fixed - npz["img_emb_fixed_rows"]).max() < tol.GOLDEN_EMB_MAX_ABS
    if "img_emb_full" in npz:
        assert rel_l2(emb, npz["img_emb_full"]) < tol.GOLDEN_EMB_REL_L2
        assert np.abs(emb - npz["img_emb_full"]).max() < tol.GOLDEN_EMB_MAX_ABS

    hidden, routing = decoder_trace(golden_model, inputs, golden_model._image_embeddings(inputs))
    assert np.abs(hidden - npz["decoder_last_pos_hidden"]).max() < tol.GOLDEN_HIDDEN_MAX_ABS
    for layer, experts in routing.items():
        want = npz[f"moe_layer{layer}_topk_idx_sorted"].astype(np.int64)
        clear = npz[f"moe_layer{layer}_gap_kth_vs_next"] > tol.GOLDEN_ROUTING_GAP
        assert clear.sum() > 0.9 * len(clear)
        assert np.array_equal(experts[clear], want[clear]), f"layer {layer} expert sets differ"

    logits = golden_model.prefill_logits(inputs)
    want = npz["prefill_last_logits"]
    assert np.abs(logits - want).max() < tol.GOLDEN_LOGITS_MAX_ABS
    assert rel_l2(logits, want) < tol.GOLDEN_LOGITS_REL_L2
    assert np.argsort(-logits)[:10].tolist() == np.argsort(-want)[:10].tolist()

    result = golden_model.ocr(image, prompt=case["prompt"], mode=case["mode"], max_new_tokens=32)
    assert result.token_ids == case["greedy"]["generated_ids"]
    assert result.prompt_tokens == case["n_tokens"] and result.image_tokens == case["n_image_tokens"]


@pytest.mark.parametrize("case_id", ["p01", "p04", "p05"])
def test_golden_vision_towers(golden_model, golden_dir, cases, case_id):
    """SAM and CLIP outputs of the global view, to localise a vision failure."""
    if golden_model.backend == "torch":
        pytest.skip("the torch towers are held to the golden image embeddings in test_golden_case")
    case = cases[case_id]
    npz = np.load(golden_dir / "cases" / f"{case_id}.npz")
    inputs = golden_model.prepare(golden_dir / case["image"], case["prompt"], mode=case["mode"])
    inner = golden_model.runtime.model.model
    with no_grad(golden_model):
        if golden_model.backend == "mlx":
            import mlx.core as mx

            sam = inner.sam_model(mx.array(inputs.global_pixels.transpose(0, 2, 3, 1)))  # MLX is channels-last
        else:
            import torch

            sam = inner.sam_model(torch.from_numpy(inputs.global_pixels))
        clip = to_numpy(inner.vision_model(sam))
        sam = to_numpy(sam).transpose(0, 3, 1, 2)  # back to the reference's NCHW
    for name, ours, want in (("sam", sam, npz["sam_out_global"]), ("clip", clip, npz["clip_out_global"])):
        assert ours.shape == want.shape, name
        assert rel_l2(ours, want) < tol.GOLDEN_EMB_REL_L2, name
        assert np.abs(ours - want).max() < tol.GOLDEN_EMB_MAX_ABS, name
