"""Pages per minute, end to end: a multi-page PDF through ``OCRModel.ocr_many`` on each backend.

    python benchmarks/bench_pdf.py [--model DIR] [--backends mlx torch] [--pages 4] [--mode gundam] [--tokens 64]
        [--batch-size 1,4,8]

Each backend runs in its own process, with the BLAS it is fastest with (OpenBLAS preloaded for MLX on
Linux, not for torch). Every page is rendered at 144 DPI, preprocessed, encoded and decoded up to
``--tokens`` tokens with the official PDF n-gram ban, as ``dsocr ocr file.pdf`` does, once per batch size
(``ocr_many(batch_size=N)``: N pages decoding together). Writes ``pdf.json`` and ``pdf.md`` into ``--out``.
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
    parser.add_argument("--mode", help="a mode of the model (default: its official one, gundam or default)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch-size", default="1", help="comma-separated batch sizes, e.g. 1,4,8")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "pdf")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one backend in this process
    args = parser.parse_args()

    if args.one:
        from dsocr_mlx.bench import run_pdf_benchmark

        print(
            json.dumps(
                run_pdf_benchmark(
                    args.model,
                    backend=args.one,
                    dtype="float32",
                    mode=args.mode,
                    pages=args.pages,
                    tokens=args.tokens,
                    batch_sizes=tuple(int(x) for x in args.batch_size.split(",")),
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
            *(["--mode", args.mode] if args.mode else []),
            "--tokens",
            str(args.tokens),
            "--batch-size",
            args.batch_size,
        ]
        rows.append(run_process(command, preload_openblas=backend == "mlx"))
    lines = [
        f"Machine: {machine()}",
        "",
        f"Model: {model}; {args.pages} pages; mode {rows[0]['settings']['mode'] if rows else args.mode}; "
        f"up to {args.tokens} tokens per page; float32.",
        "",
        "| backend | batch | pages/minute | seconds | generated tokens | vs batch 1 | peak memory (GB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        first = r["batches"][0]["pages_per_minute"]
        lines += [
            f"| {r['environment']['backend']} | {b['batch']} | {b['pages_per_minute']:.2f} | {b['seconds']:.1f} | "
            f"{b['generated_tokens']} | {b['pages_per_minute'] / first:.2f}x | {r['peak_memory_gb']:.2f} |"
            for b in r["batches"]
        ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pdf.json").write_text(json.dumps(rows, indent=1))
    (args.out / "pdf.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
