"""Per-stage timings of one OCR call through the public API: load, preprocess, vision, prefill, decode.

    python benchmarks/bench_stages.py --model DIR [--mode base] [--dtype float32] [--tokens 32] [--trials 3]

Use ``dsocr make-test-model DIR --size full`` for a full-size random checkpoint. Prints the machine,
library versions and settings with the table.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import dsocr_mlx


def page_image() -> np.ndarray:
    """A deterministic 1300x1000 page-like image (tiled in gundam mode)."""
    rng = np.random.default_rng(0)
    img = np.full((1000, 1300, 3), 240, np.uint8)
    for _ in range(200):
        y, x = rng.integers(0, 980), rng.integers(0, 1200)
        img[y : y + 14, x : x + rng.integers(30, 100)] = rng.integers(0, 60)
    return img


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--mode", default="base")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()

    import mlx.core as mx

    t = time.perf_counter()
    model = dsocr_mlx.load(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t
    image = page_image()
    rows = []
    for trial in range(args.trials + 1):  # the first run is the warm-up
        model._vision_cache = None
        t0 = time.perf_counter()
        inputs = model.prepare(image, "<image>\nFree OCR.", mode=args.mode)
        t1 = time.perf_counter()
        model.image_embeddings(inputs)
        t2 = time.perf_counter()
        model.prefill_logits(inputs)
        t3 = time.perf_counter()
        emb = model._image_embeddings(inputs)
        n = 0
        start = time.perf_counter()
        for _ in model.runtime.generate(inputs, emb, args.tokens):
            n += 1
            if n == 1:
                first = time.perf_counter()
        end = time.perf_counter()
        if trial:
            rows.append({"preprocess": t1 - t0, "vision": t2 - t1, "prefill": t3 - t2,
                         "prefill_tps": len(inputs.input_ids) / (t3 - t2), "ttft": first - start,
                         "decode_tps": (n - 1) / (end - first)})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"machine: {platform.machine()} {platform.system()} {platform.processor() or ''}, python "
          f"{sys.version.split()[0]}, mlx {mx.__version__}, dsocr-mlx {dsocr_mlx.__version__}")
    print(f"model {Path(args.model).name}, mode {args.mode}, dtype {args.dtype}, prompt {len(inputs.input_ids)} "
          f"tokens ({inputs.num_image_tokens} image), {args.tokens} generated, {args.trials} trials")
    print(f"load {load_s:.1f} s, peak RSS {peak:.2f} GiB")
    print("| stage | median |\n| --- | --- |")
    for key, unit in (("preprocess", "s"), ("vision", "s"), ("prefill", "s"), ("prefill_tps", "tok/s"),
                      ("ttft", "s"), ("decode_tps", "tok/s")):
        print(f"| {key} | {statistics.median(r[key] for r in rows):.3f} {unit} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
