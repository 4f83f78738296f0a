"""Stage timings of mlx-vlm's ``deepseekocr`` port; runs inside the peer environment, not ours.

Called by ``benchmarks/bench_peers.py`` with a folder converted by mlx-vlm's own converter. Prints one
JSON object with the same stage keys as ``dsocr_mlx.bench.time_once`` so the two can be compared.
"""

from __future__ import annotations

import resource
import time

import mlx.core as mx
from PIL import Image
from stages import print_summary, stage_parser


def time_once(model, processor, image, prompt, base_size, image_size, crop, tokens):
    from mlx_vlm.generate import generate_step

    t0 = time.perf_counter()
    inputs = processor(text=prompt, images=[image], base_size=base_size, image_size=image_size, cropping=crop)
    mx.eval(inputs["input_ids"], inputs["images"])
    t1 = time.perf_counter()
    patches, global_view = inputs["images"]
    n_tiles = int(mx.prod(inputs["images_spatial_crop"]).item()) if crop else 0
    n_tiles = n_tiles if n_tiles > 1 else 0
    extra = {"images_spatial_crop": inputs["images_spatial_crop"], "images_seq_mask": inputs["images_seq_mask"]}
    # Vision alone: the global view only, then every view, through the port's own embedding function.
    one_view = [mx.zeros((1, 3, base_size, base_size)), global_view]
    mx.eval(
        model.get_input_embeddings(
            inputs["input_ids"], one_view, mx.ones_like(inputs["images_spatial_crop"]), inputs["images_seq_mask"]
        ).inputs_embeds
    )
    t2 = time.perf_counter()
    mx.eval(model.get_input_embeddings(inputs["input_ids"], inputs["images"], **extra).inputs_embeds)
    t3 = time.perf_counter()
    # End to end as a user runs it: generate_step embeds the images again, prefills, then decodes.
    start, first, count = time.perf_counter(), None, 0
    for token, _ in generate_step(
        inputs["input_ids"], model, inputs["images"], None, max_tokens=tokens, temperature=0.0, **extra
    ):
        mx.eval(token)
        count += 1
        first = first or time.perf_counter()
    end = time.perf_counter()
    n_prompt = inputs["input_ids"].shape[1]
    vision = t3 - t2
    prefill = max(first - start - vision, 1e-9)
    return {
        "preprocess_s": t1 - t0,
        "vision_global_s": t2 - t1,
        "vision_per_tile_s": max(vision - (t2 - t1), 0.0) / n_tiles if n_tiles else 0.0,
        "vision_s": vision,
        "prefill_tps": n_prompt / prefill,
        "ttft_s": (t1 - t0) + (first - start),
        "decode_tps": (count - 1) / (end - first) if count > 1 else 0.0,
        "postprocess_s": 0.0,
        "prompt_tokens": n_prompt,
        "image_tokens": int(inputs["images_seq_mask"].sum().item()),
        "tiles": n_tiles,
    }


def main() -> None:
    args = stage_parser(__doc__).parse_args()
    if args.device != "cpu" or args.dtype != "float32":
        raise SystemExit("error: this script times mlx-vlm's float32 folder on MLX's default device only")

    from mlx_vlm import load
    from mlx_vlm.version import __version__

    t = time.perf_counter()
    model, processor = load(args.model)
    mx.eval(model.parameters())
    load_s = time.perf_counter() - t
    image = Image.open(args.image).convert("RGB")
    run = (model, processor, image, args.prompt, args.base_size, args.image_size, args.crop)
    time_once(*run, min(args.tokens, 4))  # warm-up
    runs = [time_once(*run, args.tokens) for _ in range(args.trials)]
    peak = (
        mx.get_peak_memory() / 1e9
        if mx.metal.is_available()
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)
    )
    print_summary("mlx-vlm", {"mlx-vlm": __version__, "mlx": mx.__version__}, load_s, peak, runs)


if __name__ == "__main__":
    main()
