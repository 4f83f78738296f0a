"""The MLX model on the tiny checkpoint: every branch runs, the cache changes nothing, layouts are right."""

from __future__ import annotations

import numpy as np
import pytest

from dsocr_mlx.processing import get_mode, image_token_count
from tests.conftest import assert_close
from tests.tolerances import CACHE, COMPONENT

mx = pytest.importorskip("mlx.core")

from dsocr_mlx.backends.mlx.cache import KVCache  # noqa: E402
from dsocr_mlx.backends.mlx.generate import prefill  # noqa: E402


def naive_greedy(model, embeds, steps: int) -> list[int]:
    """The oracle: recompute the whole sequence at every step, no cache."""
    out = []
    for _ in range(steps):
        logits = model(None, None, embeds)[:, -1, :]
        token = int(mx.argmax(logits, axis=-1).item())
        out.append(token)
        embeds = mx.concatenate([embeds, model.model.embed_tokens(mx.array([[token]]))], axis=1)
    return out


@pytest.fixture(scope="module")
def gundam_inputs(tiny_model, sample_image):
    return tiny_model.prepare(sample_image, "<image>\nFree OCR.", mode="gundam")


def test_tiny_config_switches_on_every_branch(tiny_model, gundam_inputs):
    inner = tiny_model.runtime.model.model
    windows = [b.window_size for b in inner.sam_model.blocks]
    assert 0 in windows and 14 in windows, windows
    kinds = [type(layer.mlp).__name__ for layer in inner.layers]
    assert kinds == ["MLP", "MoE"], kinds
    assert inner.layers[1].mlp.shared_experts is not None
    cols, rows = gundam_inputs.images_spatial_crop[0]
    assert cols * rows > 1 and gundam_inputs.crop_pixels.shape[0] == cols * rows


def test_cached_greedy_equals_naive_greedy(tiny_model, gundam_inputs):
    runtime = tiny_model.runtime
    emb = runtime.image_embeddings(gundam_inputs)
    cached = list(runtime.generate(gundam_inputs, emb, max_tokens=12))
    embeds = runtime.input_embeddings(gundam_inputs, emb)
    assert cached == naive_greedy(runtime.model, embeds, 12)


def test_chunked_prefill_equals_full_forward(tiny_model, gundam_inputs):
    model = tiny_model.runtime.model
    embeds = tiny_model.runtime.input_embeddings(gundam_inputs, tiny_model.runtime.image_embeddings(gundam_inputs))
    full = model(None, None, embeds)[0, -1]
    for step in (7, 64, 10_000):
        cache = model.make_cache()
        chunked = prefill(model, embeds, cache, step_size=step)[0]
        assert cache[0].offset == embeds.shape[1]
        assert_close(np.array(chunked), np.array(full), **CACHE, what=f"prefill step {step}")


def test_decode_step_with_cache_equals_full_forward(tiny_model):
    model = tiny_model.runtime.model
    ids = mx.array([[0, 1000, 2000, 3000, 4000, 5000]])
    full = model(ids)[0]
    cache = model.make_cache()
    model(ids[:, :4], cache)
    step1 = model(ids[:, 4:5], cache)[0, 0]
    step2 = model(ids[:, 5:6], cache)[0, 0]
    assert_close(np.array(step1), np.array(full[4]), **CACHE, what="decode step 1")
    assert_close(np.array(step2), np.array(full[5]), **CACHE, what="decode step 2")


def test_batch_of_two_equals_each_row(tiny_model):
    model = tiny_model.runtime.model
    a, b = [0, 11, 22, 33, 44], [0, 55, 66, 77, 88]
    both = model(mx.array([a, b]))
    assert_close(np.array(both[0]), np.array(model(mx.array([a]))[0]), **COMPONENT, what="row 0")
    assert_close(np.array(both[1]), np.array(model(mx.array([b]))[0]), **COMPONENT, what="row 1")


def test_kv_cache_grows_in_steps_and_trims():
    cache = KVCache()
    k = mx.ones((1, 2, 300, 4))
    keys, values = cache.update_and_fetch(k, 2 * k)
    assert cache.offset == 300 and keys.shape == (1, 2, 300, 4)
    assert cache.keys.shape[2] == 512  # two steps of 256
    keys, _ = cache.update_and_fetch(3 * mx.ones((1, 2, 1, 4)), mx.ones((1, 2, 1, 4)))
    assert keys.shape[2] == 301 and float(keys[0, 0, 300, 0]) == 3.0 and float(keys[0, 0, 299, 0]) == 1.0
    assert cache.trim(5) == 5 and cache.offset == 296
    assert cache.state[0].shape[2] == 296


def test_image_embedding_layout_local_then_global_then_separator(tiny_model, gundam_inputs):
    runtime, inputs = tiny_model.runtime, gundam_inputs
    inner = runtime.model.model
    emb = np.array(runtime.image_embeddings(inputs))
    assert emb.shape == (int(inputs.images_seq_mask.sum()), tiny_model.args.text.hidden_size)
    assert emb.shape[0] == image_token_count(tuple(inputs.images_spatial_crop[0]), get_mode("gundam"))

    cols, rows = (int(v) for v in inputs.images_spatial_crop[0])
    tiles = np.array(inner.encode_view(mx.array(inputs.crop_pixels.transpose(0, 2, 3, 1))))
    glob = np.array(inner.encode_view(mx.array(inputs.global_pixels.transpose(0, 2, 3, 1))))[0]
    newline, separator = np.array(inner.image_newline), np.array(inner.view_seperator)
    h2 = tiles.shape[1]
    # Expected: the tile mosaic row by row (one newline per full mosaic row), the global grid, the separator.
    expected = []
    for r in range(rows * h2):
        tile_row, y = divmod(r, h2)
        for c in range(cols):
            expected.extend(tiles[tile_row * cols + c, y])
        expected.append(newline)
    for y in range(glob.shape[0]):
        expected.extend(glob[y])
        expected.append(newline)
    expected.append(separator)
    assert_close(emb, np.stack(expected), **COMPONENT, what="image embedding sequence")


def test_image_rows_are_scattered_at_the_mask(tiny_model, gundam_inputs):
    runtime = tiny_model.runtime
    emb = runtime.image_embeddings(gundam_inputs)
    embeds = np.array(runtime.input_embeddings(gundam_inputs, emb))[0]
    mask = gundam_inputs.images_seq_mask
    assert_close(embeds[mask], np.array(emb), **COMPONENT, what="image rows")
    text = np.array(runtime.model.model.embed_tokens(mx.array(gundam_inputs.input_ids[~mask].astype(np.int32))))
    assert_close(embeds[~mask], text, **COMPONENT, what="text rows")


def test_two_images_in_one_prompt(tiny_model, sample_image):
    small = sample_image[:300, :400]
    inputs = tiny_model.prepare([small, sample_image], "<image>first<image>\nFree OCR.", mode="gundam")
    assert inputs.images_spatial_crop.shape == (2, 2) and inputs.global_pixels.shape[0] == 2
    emb = tiny_model.image_embeddings(inputs)
    assert emb.shape[0] == inputs.num_image_tokens
    one = tiny_model.image_embeddings(tiny_model.prepare(small, "<image>", mode="gundam"))
    assert_close(emb[: one.shape[0]], one, **COMPONENT, what="first image's rows")
    assert tiny_model.ocr([small, sample_image], "<image>first<image>\nFree OCR.", max_new_tokens=3).token_ids


def test_moe_weights_are_raw_softmax_probabilities(tiny_model):
    gate = tiny_model.runtime.model.model.layers[1].mlp.gate
    x = mx.random.normal((1, 5, tiny_model.args.text.hidden_size), key=mx.random.key(0))
    indices, weights = gate(x)
    logits = np.array(x, np.float64) @ np.array(gate.weight, np.float64).T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.sort(np.argsort(-probs, axis=-1)[..., : gate.top_k], axis=-1)
    assert np.array_equal(np.sort(np.array(indices), axis=-1), top)
    assert_close(
        np.sort(np.array(weights), -1),
        np.sort(np.take_along_axis(probs, top, -1), -1),
        **COMPONENT,
        what="router weights",
    )
    assert np.all(np.array(weights).sum(-1) < 1.0)  # not renormalised


def test_moe_grouped_prefill_path_equals_the_gather_path(tiny_model):
    experts = tiny_model.runtime.model.model.layers[1].mlp.experts
    n_experts, _, hidden = experts.gate_proj.weight.shape
    x = mx.random.normal((1, 40, hidden), key=mx.random.key(1))
    indices = mx.random.randint(0, n_experts, (1, 40, 3), key=mx.random.key(2))
    grouped = experts(x, indices)  # 120 pairs on the CPU: one matmul per expert
    one_by_one = mx.concatenate([experts(x[:, i : i + 1], indices[:, i : i + 1]) for i in range(40)], axis=1)
    assert_close(np.array(grouped), np.array(one_by_one), **CACHE, what="grouped vs gather_mm experts")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_runs_and_tracks_float32(tiny_ckpt, tiny_model, gundam_inputs, dtype):
    import dsocr_mlx

    half = dsocr_mlx.load(str(tiny_ckpt), dtype=dtype)
    assert half.runtime.model.lm_head.weight.dtype == getattr(mx, dtype)
    logits = half.prefill_logits(gundam_inputs)
    ref = tiny_model.prefill_logits(gundam_inputs)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    corr = np.corrcoef(logits, ref)[0, 1]
    assert corr > 0.99, f"{dtype} logits correlate {corr:.4f} with float32"


def test_prompt_without_room_is_refused(tiny_model, sample_image, monkeypatch):
    monkeypatch.setattr(tiny_model.args.text, "max_position_embeddings", 100)
    with pytest.raises(ValueError, match="no room"):
        tiny_model.ocr(sample_image, mode="gundam", max_new_tokens=5)


def test_generation_stops_at_eos_and_reports_it(tiny_model, sample_image, monkeypatch):
    first = tiny_model.ocr(sample_image, "<image>\nFree OCR.", mode="tiny", max_new_tokens=4)
    assert first.finish_reason == "length" and len(first.token_ids) == 4
    # Make the first generated token the EOS id: generation must stop right there.
    monkeypatch.setattr(tiny_model.args.text, "eos_token_id", first.token_ids[0])
    stopped = tiny_model.ocr(sample_image, "<image>\nFree OCR.", mode="tiny", max_new_tokens=4)
    assert stopped.finish_reason == "stop" and stopped.token_ids == first.token_ids[:1]
