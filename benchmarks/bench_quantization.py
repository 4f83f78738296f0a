"""Quantized folders against float16 on the golden inputs: size, load time, prefill KL, greedy agreement.

    python benchmarks/bench_quantization.py --ckpt /tmp/dsocr-golden-ckpt --golden ../shared/golden \\
        [--cases p03,p05] [--bits 8,4] [--tokens 32] [--work /tmp/dsocr-quant-bench]

Converts the checkpoint to float16 and to each bit width (affine, group 64) with ``dsocr_mlx.convert``,
then, per case, compares the last-prompt-position logits (KL(float16 || quantized)) and the greedy tokens.
Prints a Markdown table with the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

import dsocr_mlx
from dsocr_mlx.convert import convert

sys.path.insert(0, str(Path(__file__).resolve().parent))
from golden_runs import agreement, kl, run_case  # noqa: E402


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--golden", required=True)
    ap.add_argument("--cases", default="p03,p05")
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--work", default="/tmp/dsocr-quant-bench")
    args = ap.parse_args()

    import mlx.core as mx

    golden = Path(args.golden)
    cases = {c["id"]: c for c in json.loads((golden / "cases.json").read_text())}
    work = Path(args.work)
    variants = {"float16": None} | {f"q{b}": int(b) for b in args.bits.split(",")}
    folders = {}
    for name, bits in variants.items():
        folders[name] = work / name
        if not (folders[name] / "config.json").is_file():
            convert(args.ckpt, folders[name], dtype="float16", q_bits=bits, overwrite=True, show_progress=False)

    rows, reference = [], {}
    for name, folder in folders.items():
        t = time.perf_counter()
        # Weights as stored; on MLX's CPU backend everything computes in float32, where half-precision and
        # half-scale quantized matmuls are slow. The comparison isolates the weight quantization error.
        model = dsocr_mlx.load(str(folder), dtype="float32" if mx.default_device() == mx.cpu else None)
        load_s = time.perf_counter() - t
        kls, agree = [], []
        for cid in args.cases.split(","):
            case = cases[cid]
            logits, tokens = run_case(model, golden, case, args.tokens)
            if name == "float16":
                reference[cid] = (logits, tokens)
            ref_logits, ref_tokens = reference[cid]
            kls.append(kl(ref_logits, logits))
            same, _ = agreement(tokens, ref_tokens)
            agree.append(same / max(len(ref_tokens), 1))
        rows.append((name, folder_bytes(folder) / 1e9, load_s, float(np.mean(kls)), float(np.mean(agree))))
        del model

    print(
        f"machine: {platform.machine()} {platform.system()}, python {sys.version.split()[0]}, mlx {mx.__version__}, "
        f"dsocr-mlx {dsocr_mlx.__version__}, device {mx.default_device()}"
    )
    print(f"checkpoint {args.ckpt}, cases {args.cases}, {args.tokens} greedy tokens, affine group 64\n")
    print("| variant | weights (GB) | load (s) | prefill KL vs float16 | greedy prefix agreement |")
    print("| --- | --- | --- | --- | --- |")
    for name, gb, load_s, mean_kl, mean_agree in rows:
        print(f"| {name} | {gb:.2f} | {load_s:.1f} | {mean_kl:.2e} | {100 * mean_agree:.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
