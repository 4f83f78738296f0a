"""Half precision and quantized weights against the float32 golden cases: how far the numbers move.

    python benchmarks/bench_precision.py --ckpt /tmp/dsocr2-golden-ckpt --golden ../shared/golden2 \\
        [--cases g01,g02,g05] [--variants float16,bfloat16,q8,q4] [--backend mlx] [--work /tmp/dsocr-precision]

Works for both model families (the golden cases name their mode). Per variant and case: the prefill logits
against the official float32 ones (max |d| and KL), and the greedy tokens against the official 32
(the prefix that agrees, and how many agree in all). ``float16``/``bfloat16`` load the checkpoint in that
dtype; ``qN`` converts it with ``dsocr_mlx.convert`` (float16, N-bit affine, group 64; MLX only) and runs it
as MLX runs quantized folders on this device (float32 compute on MLX's CPU backend). Prints a Markdown
table with the machine and versions.
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


def variant_model(name: str, ckpt: str, work: Path, backend: str):
    """The model of one variant: a dtype of the original checkpoint, or a quantized conversion."""
    if name.startswith("q"):
        folder = work / name
        if not (folder / "config.json").is_file():
            convert(ckpt, folder, dtype="float16", q_bits=int(name[1:]), overwrite=True, show_progress=False)
        return dsocr_mlx.load(str(folder), backend="mlx")
    return dsocr_mlx.load(ckpt, backend=backend, dtype=name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True, help="the golden checkpoint (its make_checkpoint.py output)")
    ap.add_argument("--golden", required=True, help="the golden folder (cases.json, cases/)")
    ap.add_argument("--cases", help="comma-separated case ids (default: all)")
    ap.add_argument("--variants", default="float16,bfloat16,q8,q4")
    ap.add_argument("--backend", default="mlx", choices=["mlx", "torch"])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--work", default="/tmp/dsocr-precision")
    args = ap.parse_args()

    golden = Path(args.golden)
    cases = {c["id"]: c for c in json.loads((golden / "cases.json").read_text())}
    chosen = args.cases.split(",") if args.cases else list(cases)
    rows = []
    for name in args.variants.split(","):
        t = time.perf_counter()
        model = variant_model(name, args.ckpt, Path(args.work), args.backend)
        load_s = time.perf_counter() - t
        for cid in chosen:
            case = cases[cid]
            t = time.perf_counter()
            logits, tokens = run_case(model, golden, case, args.tokens)
            want = np.load(golden / "cases" / f"{cid}.npz")["prefill_last_logits"]
            prefix, same = agreement(tokens, case["greedy"]["generated_ids"][: args.tokens])
            rows.append(
                {
                    "variant": name,
                    "dtype": model.dtype,
                    "case": cid,
                    "max_abs_logits": float(np.abs(logits - want).max()),
                    "kl": kl(want, logits),
                    "prefix": prefix,
                    "same": same,
                    "tokens": min(args.tokens, len(case["greedy"]["generated_ids"])),
                    "seconds": time.perf_counter() - t,
                    "load_s": load_s,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del model

    import mlx.core as mx

    print(
        f"machine: {platform.machine()} {platform.system()}, python {sys.version.split()[0]}, mlx {mx.__version__}, "
        f"dsocr-mlx {dsocr_mlx.__version__}, backend {args.backend}, device {mx.default_device()}"
    )
    print(f"checkpoint {args.ckpt}, golden {golden}, {args.tokens} greedy tokens per case\n")
    print("| variant (compute dtype) | case | logits max \\|d\\| | KL vs float32 | agreeing prefix | same tokens |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['variant']} ({r['dtype']}) | {r['case']} | {r['max_abs_logits']:.3g} | {r['kl']:.2e} | "
            f"{r['prefix']}/{r['tokens']} | {r['same']}/{r['tokens']} |"
        )
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        print(
            f"\n{name}: {sum(r['same'] for r in mine)} of {sum(r['tokens'] for r in mine)} tokens equal, "
            f"{sum(r['prefix'] for r in mine)} before the first difference",
            end="",
        )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
