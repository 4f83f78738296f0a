"""The golden cases of the official DeepSeek-OCR-2 code (../shared/golden2) reproduced in float32 through
the public API, on both backends."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests import tolerances as tol
from tests.test_golden import decoder_trace, no_grad, rel_l2, rle_expand, to_numpy

pytestmark = pytest.mark.slow

CASE_IDS = ["g01", "g02", "g03", "g04", "g05"]


@pytest.fixture(scope="module", params=["mlx", "torch"])
def golden2_model(request, golden2_ckpt):
    """The golden v2 checkpoint in float32 on each backend (one loaded at a time)."""
    pytest.importorskip("mlx.core" if request.param == "mlx" else "torch")
    import dsocr_mlx

    model = dsocr_mlx.load(str(golden2_ckpt), backend=request.param, dtype="float32")
    assert model.family == "deepseek-ocr-2"
    yield model
    del model


@pytest.fixture(scope="module")
def cases2(golden2_dir):
    return {c["id"]: c for c in json.loads((golden2_dir / "cases.json").read_text())}


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_golden2_case(golden2_model, golden2_dir, cases2, case_id):
    case = cases2[case_id]
    npz = np.load(golden2_dir / "cases" / f"{case_id}.npz")
    image = golden2_dir / case["image"]

    inputs = golden2_model.prepare(image, case["prompt"], mode=case["mode"])
    assert inputs.input_ids.tolist() == case["input_ids"]
    assert np.array_equal(inputs.images_seq_mask, rle_expand(case["images_seq_mask_rle"]))
    assert inputs.images_spatial_crop.tolist() == case["images_spatial_crop"]
    assert np.array_equal(inputs.global_pixels[0, :, ::16, ::16], npz["global_view_sub16"])
    assert inputs.crop_pixels.shape[0] == case["n_crop_tiles"]
    if case["n_crop_tiles"]:
        assert np.array_equal(inputs.crop_pixels[:, :, ::16, ::16], npz["crops_sub16"])

    emb = golden2_model.image_embeddings(inputs)
    assert emb.shape == (case["n_image_tokens"], 1280)
    assert rel_l2(np.linalg.norm(emb, axis=1), npz["img_emb_row_norm"]) < tol.GOLDEN_EMB_REL_L2
    fixed = emb[npz["img_emb_fixed_rows_idx"]]
    assert rel_l2(fixed, npz["img_emb_fixed_rows"]) < tol.GOLDEN_EMB_REL_L2
    assert np.abs(fixed - npz["img_emb_fixed_rows"]).max() < tol.GOLDEN_EMB_MAX_ABS
    if "img_emb_full" in npz:
        assert rel_l2(emb, npz["img_emb_full"]) < tol.GOLDEN_EMB_REL_L2
        assert np.abs(emb - npz["img_emb_full"]).max() < tol.GOLDEN_EMB_MAX_ABS

    hidden, routing = decoder_trace(golden2_model, inputs, golden2_model._image_embeddings(inputs))
    assert np.abs(hidden - npz["decoder_last_pos_hidden"]).max() < tol.GOLDEN_HIDDEN_MAX_ABS
    for layer, experts in routing.items():
        want = npz[f"moe_layer{layer}_topk_idx_sorted"].astype(np.int64)
        clear = npz[f"moe_layer{layer}_gap_kth_vs_next"] > tol.GOLDEN_ROUTING_GAP
        assert clear.sum() > 0.9 * len(clear)
        assert np.array_equal(experts[clear], want[clear]), f"layer {layer} expert sets differ"

    logits = golden2_model.prefill_logits(inputs)
    want = npz["prefill_last_logits"]
    assert np.abs(logits - want).max() < tol.GOLDEN_LOGITS_MAX_ABS
    assert rel_l2(logits, want) < tol.GOLDEN_LOGITS_REL_L2
    assert np.argsort(-logits)[:10].tolist() == np.argsort(-want)[:10].tolist()

    result = golden2_model.ocr(image, prompt=case["prompt"], mode=case["mode"], max_new_tokens=32)
    assert result.token_ids == case["greedy"]["generated_ids"]
    assert result.prompt_tokens == case["n_tokens"] and result.image_tokens == case["n_image_tokens"]


def test_golden2_vision_towers(golden2_model, golden2_dir, cases2):
    """SAM and Qwen2-encoder outputs, to localise a vision failure: the global view on MLX (its CPU
    SAM is slow), the global view and the first 768 tile on torch."""
    case_id = "g01" if golden2_model.backend == "mlx" else "g02"
    case = cases2[case_id]
    npz = np.load(golden2_dir / "cases" / f"{case_id}.npz")
    inputs = golden2_model.prepare(golden2_dir / case["image"], case["prompt"], mode=case["mode"])
    runtime, inner = golden2_model.runtime, golden2_model.runtime.model.model
    views = [("global", inputs.global_pixels)]
    if golden2_model.backend == "torch":
        views.append(("tile0", inputs.crop_pixels[:1]))
    for view, pixels in views:
        with no_grad(golden2_model):
            sam = inner.sam_model(runtime.pixels(pixels))  # (B, g, g, C) on both backends
            queries = to_numpy(inner.qwen2_model(sam))
            sam = to_numpy(sam).transpose(0, 3, 1, 2)  # the reference's NCHW
        for name, ours, want in (("sam", sam, npz[f"sam_out_{view}"]), ("qwen2", queries, npz[f"qwen2_out_{view}"])):
            assert ours.shape == want.shape, f"{name} {view}"
            assert rel_l2(ours, want) < tol.GOLDEN_EMB_REL_L2, f"{name} {view}"
            assert np.abs(ours - want).max() < tol.GOLDEN_EMB_MAX_ABS, f"{name} {view}"
