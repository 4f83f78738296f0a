"""mlx-vlm's ``deepseekocr_2`` port against the DeepSeek-OCR-2 golden cases; runs inside the mlx-vlm environment.

    python mlx_vlm_golden2.py --model CONVERTED --golden ../shared/golden2 [--cases g01,g05] [--json out.json]

``CONVERTED`` is a folder made by mlx-vlm's own converter from the golden2 checkpoint (``bench_peers.py golden2``
makes it). Each case goes the way an mlx-vlm user runs it: ``mlx_vlm.utils.load_image`` (EXIF transpose, RGB),
the prompt without its ``<image>`` line through ``mlx_vlm.prompt_utils.apply_chat_template``, the port's
processor, ``get_input_embeddings``, the language model and ``generate_step`` (greedy, 32 tokens, no penalty).
The processor gets the official settings where its API takes them: global view 1024, tiles of 768, 2-6 tiles
(its default minimum is 1) and ``cropping`` only when a side exceeds 768 (the official ``infer()`` rule, which the
processor leaves to its caller). What it does with its own defaults is printed too.

Criteria are those of ``golden2/check.py`` (float32): ids, mask and crop grid exact; pixels within 4/255 max
and 1e-3 mean on the 1/16 grid after rounding to bf16; image embeddings rel-L2 <= 1e-4 (row norms, fixed rows, full
sequence without tiles) and max |d| <= 1e-3; prefill logits max |d| <= 1e-2 with equal top-10; 32 greedy tokens
equal. The model stages run on the golden ids and mask with the port's own pixels, so that a text-token difference
does not hide how the model itself does. Prints one line per case (the first stage that departs, with numbers)
and a summary; exits 0 only when every case passes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import traceback
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_vlm_stages import chat_prompt

TILE, GLOBAL = 768, 1024
MIN_TILES, MAX_TILES = 2, 6
STAGE_ORDER = ("ids", "pixels", "embeddings", "logits", "tokens")


def rle_expand(rle) -> np.ndarray:
    return np.concatenate([np.full(int(n), bool(v)) for v, n in rle])


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def to_bf16_values(a) -> np.ndarray:
    """float32 -> the nearest bfloat16 value (round to nearest even), as float32 (as check.py)."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    r = ((u + (((u >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype(np.uint32) << 16
    return r.view(np.float32)


def bf16_sha256(a) -> str:
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    bits = ((u + (((u >> 16) & 1) + np.uint32(0x7FFF))) >> 16).astype("<u2")
    return hashlib.sha256(bits.tobytes()).hexdigest()


def numpy32(x) -> np.ndarray:
    return np.array(x.astype(mx.float32) if isinstance(x, mx.array) else x, dtype=np.float32)


def check_pixels(name, got, sub16_ref, sha_ref, n_expected, size, record) -> None:
    arr = numpy32(got)
    if arr.shape != (n_expected, 3, size, size):
        record.fail("pixels", f"{name} shape {list(arr.shape)} vs {[n_expected, 3, size, size]}")
        return
    q = to_bf16_values(arr)[:, :, ::16, ::16]
    d = np.abs(q - sub16_ref.reshape(q.shape))
    exact = bf16_sha256(arr) == sha_ref
    record.values[f"{name}_max"] = float(d.max())
    record.values[f"{name}_bf16_exact"] = exact
    if d.max() > 4 / 255 + 1e-6 or d.mean() > 1e-3:
        record.fail("pixels", f"{name} max|d| {d.max():.3g} mean|d| {d.mean():.2e} on the 1/16 grid")
    record.notes.append(f"{name} {'bf16-exact' if exact else 'not bf16-exact'}")


class Record:
    """What one case found: failures per stage (in pipeline order), numbers and notes."""

    def __init__(self, case_id: str):
        self.case_id = case_id
        self.fails: list[tuple[str, str]] = []
        self.notes: list[str] = []
        self.values: dict = {}

    def fail(self, stage: str, message: str) -> None:
        self.fails.append((stage, message))

    def first_departure(self) -> str | None:
        stages = [s for s, _ in self.fails]
        return next((s for s in STAGE_ORDER if s in stages), stages[0] if stages else None)


def vision_parts(model, patches, global_view, n_tiles):
    """SAM and Qwen2-encoder outputs of the global view and tile 0, in the golden layout (for localising)."""
    out = {}
    views = [("global", global_view[:1])] + ([("tile0", patches[:1])] if n_tiles else [])
    for name, view in views:
        hwc = view.astype(mx.float32).transpose(0, 2, 3, 1)
        sam = model.sam_model(hwc)
        qwen2 = model.vision_model(hwc, sam)
        out[f"sam_out_{name}"] = numpy32(sam.transpose(0, 3, 1, 2))
        out[f"qwen2_out_{name}"] = numpy32(qwen2)
    return out


def check_interpolations(model, golden: Path) -> dict[str, dict[str, float]]:
    """The 768-tile path's position tables next to the official ones (``interp.npz``, channels 0-7): SAM's
    pos-embed 64 -> 48 and global block 2's rel-pos 127 -> 95, as the port computes them."""
    from mlx_vlm.models.deepseekocr.sam import get_abs_pos_sam, get_rel_pos

    ref = np.load(golden / "interp.npz")
    sam = model.sam_model
    attn = sam.blocks[2].attn
    got = {
        "sam_pos_48_ch0_8": get_abs_pos_sam(sam.pos_embed, 48)[0, :, :, :8],
        "sam_block2_rel_pos_h_q48_ch0_8": get_rel_pos(48, 48, attn.rel_pos_h)[..., :8],
        "sam_block2_rel_pos_w_q48_ch0_8": get_rel_pos(48, 48, attn.rel_pos_w)[..., :8],
    }
    out = {}
    for name, value in got.items():
        a, b = numpy32(value), ref[name]
        out[name] = {"max_abs": float(np.abs(a - b).max()), "rel_l2": rel_l2(a, b), "scale": float(np.abs(b).max())}
    return out


def check_case(model, processor, config, case, npz, golden: Path, record: Record) -> None:
    from mlx_vlm.generate import generate_step
    from mlx_vlm.utils import load_image

    image = load_image(str(golden / case["image"]))
    formatted = chat_prompt(processor, config, case["prompt"])
    record.values["formatted_prompt"] = formatted
    kwargs = {
        "base_size": GLOBAL,
        "image_size": TILE,
        "cropping": max(image.size) > TILE,
        "min_patches": MIN_TILES,
        "max_patches": MAX_TILES,
    }
    inputs = processor(text=formatted, images=[image], **kwargs)
    # What the port does by itself (cropping on, 1-6 tiles): preprocessing only.
    own = processor(text=formatted, images=[image])
    own_grid = np.array(own["images_spatial_crop"]).reshape(-1, 2).tolist()
    own_tokens = int(np.array(own["images_seq_mask"]).sum())
    record.values["own_defaults"] = {"grid": own_grid, "image_tokens": own_tokens}
    if own_tokens != case["n_image_tokens"]:
        record.notes.append(
            f"own defaults: grid {own_grid}, {own_tokens} image tokens (golden {case['n_image_tokens']})"
        )

    # 1. ids, mask, crop grid
    ids = np.array(inputs["input_ids"]).reshape(-1)
    mask = np.array(inputs["images_seq_mask"]).reshape(-1).astype(bool)
    want_mask = rle_expand(case["images_seq_mask_rle"])
    record.values["n_tokens"] = [len(ids), case["n_tokens"]]
    if ids.tolist() != case["input_ids"]:
        first = next((i for i, (a, b) in enumerate(zip(ids.tolist(), case["input_ids"])) if a != b), None)
        record.fail("ids", f"input_ids differ (len {len(ids)} vs {case['n_tokens']}, first difference at {first})")
    if mask.shape != want_mask.shape or not np.array_equal(mask, want_mask):
        record.fail("ids", f"images_seq_mask differs ({int(mask.sum())} vs {case['n_image_tokens']} image tokens)")
    grid = np.array(inputs["images_spatial_crop"]).reshape(-1, 2).astype(int).tolist()
    n_tiles = case["n_crop_tiles"]
    if grid != case["images_spatial_crop"]:
        if n_tiles == 0 and grid == [[0, 0]]:
            record.notes.append(
                "crop grid [[0, 0]] (the port's 'no tiles'; the model reads the pixels, like the official)"
            )
        else:
            record.fail("ids", f"crop grid {grid} vs {case['images_spatial_crop']}")

    # 2. pixels
    patches, global_view = inputs["images"]
    check_pixels(
        "global_pixels", global_view, npz["global_view_sub16"], case["global_view"]["sha256_bf16"], 1, GLOBAL, record
    )
    if n_tiles:
        check_pixels("crop_pixels", patches, npz["crops_sub16"], case["crops"]["sha256_raw"], n_tiles, TILE, record)
    elif np.any(numpy32(patches) != 0):
        record.fail("pixels", "tiles made where the official code makes none")

    # 3. image embeddings, on the golden ids and mask with the port's pixels
    gold_ids = mx.array([case["input_ids"]])
    gold_mask = mx.array(want_mask[None])
    grid_in = inputs["images_spatial_crop"]
    embeds = model.get_input_embeddings(gold_ids, inputs["images"], grid_in, gold_mask).inputs_embeds
    mx.eval(embeds)
    emb = numpy32(embeds[0])[want_mask]
    if emb.shape[0] != case["n_image_tokens"]:
        record.fail("embeddings", f"image embedding rows {emb.shape[0]} vs {case['n_image_tokens']}")
    else:
        r1 = rel_l2(np.linalg.norm(emb, axis=1), npz["img_emb_row_norm"])
        idx = npz["img_emb_fixed_rows_idx"]
        r2 = rel_l2(emb[idx], npz["img_emb_fixed_rows"])
        m2 = float(np.abs(emb[idx] - npz["img_emb_fixed_rows"]).max())
        values = {"row_norm_rel_l2": r1, "fixed_rows_rel_l2": r2, "fixed_rows_max_abs": m2}
        if "img_emb_full" in npz:  # the no-tile cases hold every row
            values["full_rel_l2"] = rel_l2(emb, npz["img_emb_full"])
            values["full_max_abs"] = float(np.abs(emb - npz["img_emb_full"]).max())
        record.values["embeddings"] = values
        worst = max(v for k, v in values.items() if k.endswith("rel_l2"))
        if worst > 1e-4 or values.get("full_max_abs", 0.0) > 1e-3:
            record.fail(
                "embeddings",
                "image embeddings " + ", ".join(f"{k.replace('_', ' ')} {v:.2e}" for k, v in values.items()),
            )
            parts = vision_parts(model, patches, global_view, n_tiles)
            where = {k: rel_l2(v, npz[k]) for k, v in parts.items() if k in npz and v.shape == npz[k].shape}
            record.values["vision_parts_rel_l2"] = where
            record.notes.append("localised: " + ", ".join(f"{k} rel-L2 {v:.2e}" for k, v in where.items()))

    # 4. prefill logits (last position), through the port's language model
    logits = numpy32(model.language_model(gold_ids, inputs_embeds=embeds).logits[0, -1])
    golden_logits = npz["prefill_last_logits"]
    if logits.shape != golden_logits.shape:
        record.fail("logits", f"logits shape {logits.shape} vs {golden_logits.shape}")
    else:
        mad = float(np.abs(logits - golden_logits).max())
        top, gtop = np.argsort(-logits)[:10].tolist(), np.argsort(-golden_logits)[:10].tolist()
        record.values["logits"] = {"max_abs": mad, "top10_equal": top == gtop}
        if mad > 1e-2:
            record.fail("logits", f"prefill logits max|d| {mad:.3g} (limit 0.01)")
        if top != gtop:
            record.fail("logits", f"prefill top-10 ids differ (top-1 {top[0]} vs {gtop[0]})")

    # 5. greedy tokens, through the port's own generate_step (it embeds the images again)
    got = []
    extra = {"images_spatial_crop": grid_in, "images_seq_mask": gold_mask}
    for token, _ in generate_step(gold_ids, model, inputs["images"], None, max_tokens=32, temperature=0.0, **extra):
        got.append(int(np.array(token).reshape(-1)[0]))
    want = case["greedy"]["generated_ids"][:32]
    agree = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    record.values["tokens_agree"] = agree
    if agree < len(want):
        margin = case["greedy"]["step_margin_top1_top2"][agree]
        record.fail("tokens", f"greedy tokens agree {agree}/{len(want)} (golden margin at divergence {margin:.3g})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder converted by mlx-vlm's converter (deepseekocr_2)")
    parser.add_argument("--golden", required=True, type=Path, help="the golden2 folder")
    parser.add_argument("--cases", default="", help="comma-separated case ids (default: all)")
    parser.add_argument("--json", type=Path, help="write the per-case results here")
    args = parser.parse_args()

    from mlx_vlm import load
    from mlx_vlm.version import __version__

    cases = json.loads((args.golden / "cases.json").read_text())
    if args.cases:
        cases = [c for c in cases if c["id"] in args.cases.split(",")]
    t = time.perf_counter()
    model, processor = load(args.model)
    mx.eval(model.parameters())
    import PIL

    print(
        f"mlx-vlm {__version__}, mlx {mx.__version__}, Pillow {PIL.__version__}: loaded {args.model} "
        f"in {time.perf_counter() - t:.1f}s"
    )
    interp = check_interpolations(model, args.golden)
    print(
        "tile path position tables vs interp.npz: "
        + ", ".join(f"{k} max|d| {v['max_abs']:.3g} rel-L2 {v['rel_l2']:.2e}" for k, v in interp.items())
    )
    results, ok = [], 0
    for case in cases:
        record = Record(case["id"])
        t = time.perf_counter()
        try:
            npz = dict(np.load(args.golden / "cases" / f"{case['id']}.npz"))
            check_case(model, processor, model.config, case, npz, args.golden, record)
        except Exception as e:  # noqa: BLE001 - report, do not hide
            record.fail("error", f"{type(e).__name__}: {e}")
            traceback.print_exc(limit=3)
        seconds = time.perf_counter() - t
        first = record.first_departure()
        status = (
            "ok" if not record.fails else f"FAIL (first departs at {first}): " + "; ".join(m for _, m in record.fails)
        )
        print(f"{case['id']} {seconds:6.1f}s {status} [{', '.join(record.notes)}]", flush=True)
        ok += not record.fails
        results.append(
            {
                "id": case["id"],
                "passed": not record.fails,
                "first_departure": first,
                "fails": [{"stage": s, "message": m} for s, m in record.fails],
                "notes": record.notes,
                "values": record.values,
                "seconds": seconds,
            }
        )
    agree = sum(r["values"].get("tokens_agree", 0) for r in results)
    summary = f"{ok}/{len(cases)} cases match (mlx-vlm {__version__}, float32); greedy tokens agreeing: "
    summary += f"{agree}/{32 * len(cases)}"
    print(summary)
    if args.json:
        payload = {"mlx_vlm": __version__, "mlx": mx.__version__, "pillow": PIL.__version__, "summary": summary}
        payload.update(interpolations=interp, cases=results)
        args.json.write_text(json.dumps(payload, indent=1))
    return 0 if ok == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())
