"""Pages per minute, end to end: a multi-page PDF through ``OCRModel.ocr_many`` on each backend.

    python benchmarks/bench_pdf.py [--model DIR] [--backends mlx torch] [--pages 4] [--mode gundam] [--tokens 64]

Each backend runs in its own process, with the BLAS it is fastest with (OpenBLAS preloaded for MLX on
Linux, not for torch). Every page is rendered at 144 DPI, preprocessed, encoded and decoded up to
``--tokens`` tokens with the official PDF n-gram ban, as ``dsocr ocr file.pdf`` does. Writes
``pdf.json`` and ``pdf.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_peers import run_process  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the full-size random checkpoint)")
    parser.add_argument("--backends", nargs="+", default=["mlx", "torch"], choices=["mlx", "torch"])
    parser.add_argument("--pages", type=int, default=4)
    parser.add_argument("--mode", default="gundam", choices=["tiny", "small", "base", "large", "gundam"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "pdf")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one backend in this process
    args = parser.parse_args()

    if args.one:
        from dsocr_mlx.bench import run_pdf_benchmark

        print(
            json.dumps(
                run_pdf_benchmark(
                    args.model, backend=args.one, dtype="float32", mode=args.mode, pages=args.pages, tokens=args.tokens
                )
            )
        )
        return 0
    from dsocr_mlx.bench import machine
    from dsocr_mlx.random_checkpoint import default_bench_checkpoint

    model = args.model or str(default_bench_checkpoint())
    rows = []
    for backend in args.backends:
        print(f"running {backend} ...", file=sys.stderr, flush=True)
        command = [
            sys.executable,
            __file__,
            "--one",
            backend,
            "--model",
            model,
            "--pages",
            str(args.pages),
            "--mode",
            args.mode,
            "--tokens",
            str(args.tokens),
        ]
        rows.append(run_process(command, preload_openblas=backend == "mlx"))
    lines = [
        f"Machine: {machine()}",
        "",
        f"Model: {model}; {args.pages} pages; mode {args.mode}; up to {args.tokens} tokens per page; float32.",
        "",
        "| backend | pages/minute | seconds | generated tokens | peak memory (GB) |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['environment']['backend']} | {r['pages_per_minute']:.2f} | {r['seconds']:.1f} | "
        f"{r['generated_tokens']} | {r['peak_memory_gb']:.2f} |"
        for r in rows
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pdf.json").write_text(json.dumps(rows, indent=1))
    (args.out / "pdf.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
