"""Per-token host overhead at batch 1: decode on a tiny random checkpoint, where the model's arithmetic is near
zero, so a token's time is mostly Python, graph building and dispatch (what Metal would also pay).

    python benchmarks/bench_host_overhead.py [--model DIR] [--backends mlx torch] [--tokens 200] [--trials 7]
        [--code DIR]

``--code`` imports ``dsocr_mlx`` from another checkout (e.g. ``git worktree add /tmp/before <commit>``) to
compare code before and after a change on the same weights. Without ``--model`` a tiny DeepSeek-OCR
checkpoint is written once into the user cache. Each backend runs in its own process (OpenBLAS preloaded for
MLX on Linux). Prints ms per token (median and best of ``--trials`` runs after one warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_peers import cache_dir, run_process  # noqa: E402


def one(backend: str, model: str, tokens: int, trials: int) -> dict:
    """Decode tok/s of ``trials`` runs of ``tokens`` tokens on ``backend`` (in this process)."""
    import dsocr_mlx
    from dsocr_mlx.bench import bench_options, page_image

    loaded = dsocr_mlx.load(model, backend=backend, dtype="float32")
    options = bench_options("tiny", tokens)
    image = page_image(640, 560, seed=100)
    loaded.ocr(image, options=options.merged(max_new_tokens=4))  # warm-up
    rates = [loaded.ocr(image, options=options).timings["generation_tps"] for _ in range(trials)]
    return {
        "backend": backend,
        "code": str(Path(dsocr_mlx.__file__).parent.parent),
        "ms_per_token": 1000 / statistics.median(rates),
        "best_ms_per_token": 1000 / max(rates),
        "tokens_per_second": rates,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a tiny checkpoint (default: written once into the user cache)")
    parser.add_argument("--backends", nargs="+", default=["mlx", "torch"], choices=["mlx", "torch"])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--code", type=Path, help="a checkout whose dsocr_mlx to import instead of this one")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one backend in this process
    args = parser.parse_args()
    if args.code:
        sys.path.insert(0, str(args.code.resolve()))
    if args.one:
        print(json.dumps(one(args.one, args.model, args.tokens, args.trials)))
        return 0
    model = args.model
    if model is None:
        from dsocr_mlx.random_checkpoint import preset_args, write_random_checkpoint

        folder = cache_dir() / "random-tiny-seed0"
        if not (folder / "config.json").is_file():
            write_random_checkpoint(folder, preset_args("tiny", "deepseek-ocr", None), seed=0, overwrite=True)
        model = str(folder)
    for backend in args.backends:
        command = [sys.executable, __file__, "--one", backend, "--model", model]
        command += ["--tokens", str(args.tokens), "--trials", str(args.trials)]
        if args.code:
            command += ["--code", str(args.code)]
        r = run_process(command, preload_openblas=backend == "mlx")
        print(
            f"{backend} ({r['code']}): {r['ms_per_token']:.2f} ms/token median, {r['best_ms_per_token']:.2f} best, "
            f"{args.tokens} tokens x {args.trials} trials"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
