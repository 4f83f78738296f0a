"""Stage timings of mlx-vlm's ``deepseekocr`` and ``deepseekocr_2`` ports; runs inside the peer environment, not ours.

Called by ``benchmarks/bench_peers.py`` with a folder converted by mlx-vlm's own converter. Prints one
JSON object with the same stage keys as ``dsocr_mlx.bench.time_once`` so the two can be compared. The
prompt goes through mlx-vlm's own chat template, as its ``generate`` does (see :func:`chat_prompt`).

DeepSeek-OCR-2 (``--min-tiles``/``--max-tiles`` given): mlx-vlm's processor defaults to 1-6 tiles and tiles
every image; the official ``infer()`` uses 2-6 and no tiles when both sides are at most the tile size. The
processor is called with the official bounds, and ``cropping`` follows the official rule (its API has no
switch for that rule, so the caller applies it, as the official ``infer()`` does).
"""

from __future__ import annotations

import resource
import time

import mlx.core as mx
from PIL import Image
from stages import print_summary, stage_parser


def chat_prompt(processor, config, prompt: str) -> str:
    """``prompt`` (``<image>\n`` + text) as mlx-vlm's own generate formats it: the text through its chat template,
    which puts ``<image>\n`` first and a space last. Its processor drops the last token in inference mode (that
    space); a raw prompt would lose its last real token instead (the '.' of '<image>\nFree OCR.')."""
    from mlx_vlm.prompt_utils import apply_chat_template

    head = "<image>\n"
    if not prompt.startswith(head):
        raise ValueError(f"the prompt must start with {head!r}: {prompt!r}")
    return apply_chat_template(processor, config, prompt[len(head) :], num_images=1)


def processor_kwargs(image, base_size, image_size, crop, min_tiles=None, max_tiles=None):
    """The processor's keyword arguments for one image: DeepSeek-OCR's as they were; for DeepSeek-OCR-2
    (tile bounds given) the official bounds, and tiles only when a side exceeds the tile size."""
    kwargs = {"base_size": base_size, "image_size": image_size, "cropping": crop}
    if min_tiles is not None:
        kwargs["cropping"] = crop and max(image.size) > image_size
        kwargs.update(min_patches=min_tiles, max_patches=max_tiles)
    return kwargs


def count_tiles(inputs, kwargs) -> int:
    """Tiles the processor made: DeepSeek-OCR's grid (1x1 means none there), DeepSeek-OCR-2's patch count (a
    single tile is a tile there; without cropping it returns one zero placeholder)."""
    if not kwargs["cropping"]:
        return 0
    if "min_patches" in kwargs:
        return int(inputs["images"][0].shape[0])
    n_tiles = int(mx.prod(inputs["images_spatial_crop"]).item())
    return n_tiles if n_tiles > 1 else 0


def time_once(model, processor, image, prompt, kwargs, tokens):
    from mlx_vlm.generate import generate_step

    base_size = kwargs["base_size"]
    t0 = time.perf_counter()
    inputs = processor(text=prompt, images=[image], **kwargs)
    mx.eval(inputs["input_ids"], inputs["images"])
    t1 = time.perf_counter()
    patches, global_view = inputs["images"]
    n_tiles = count_tiles(inputs, kwargs)
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
    kwargs = processor_kwargs(image, args.base_size, args.image_size, args.crop, args.min_tiles, args.max_tiles)
    prompt = chat_prompt(processor, model.config, args.prompt)
    run = (model, processor, image, prompt, kwargs)
    time_once(*run, min(args.tokens, 4))  # warm-up
    runs = [time_once(*run, args.tokens) for _ in range(args.trials)]
    grid = processor(text=prompt, images=[image], **kwargs)["images_spatial_crop"].tolist()
    peak = (
        mx.get_peak_memory() / 1e9
        if mx.metal.is_available()
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)
    )
    inputs = {"processor": " ".join(f"{k}={v}" for k, v in kwargs.items()), "grid": grid}
    print_summary("mlx-vlm", {"mlx-vlm": __version__, "mlx": mx.__version__}, load_s, peak, runs, inputs)


if __name__ == "__main__":
    main()
