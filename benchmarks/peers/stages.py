"""What every peer timing script shares: its command line and the JSON object it prints.

Stdlib only: the scripts run inside the peers' environments, where this project is not installed.
"""

from __future__ import annotations

import argparse
import json
import statistics


def stage_parser(description: str) -> argparse.ArgumentParser:
    """The arguments ``bench_peers.py`` passes to every peer: model, image, prompt, mode, tokens, trials,
    for DeepSeek-OCR-2 the tile bounds, and for the torch peers the device and dtype."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--base-size", type=int, required=True)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--crop", action="store_true")
    parser.add_argument("--min-tiles", type=int, help="DeepSeek-OCR-2: the official tile bounds (2 and 6)")
    parser.add_argument("--max-tiles", type=int)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (torch peers)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return parser


def print_summary(
    name: str,
    versions: dict[str, str],
    load_s: float,
    peak_memory_gb: float,
    runs: list[dict[str, float]],
    inputs: dict | None = None,
) -> None:
    """One JSON line with the keys of ``dsocr_mlx.bench.run_benchmark``'s result that the report reads;
    ``inputs`` (optional) says how the peer's processor was called and what it made of the image."""
    summary = {
        "name": name,
        "versions": versions,
        "load_s": load_s,
        "peak_memory_gb": peak_memory_gb,
        "median": {k: statistics.median(r[k] for r in runs) for k in runs[0]},
        "trials": runs,
    }
    if inputs:
        summary["inputs"] = inputs
    print(json.dumps(summary))
