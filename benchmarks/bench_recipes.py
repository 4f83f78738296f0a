"""Quantization recipes against float16: folder size (measured on the golden checkpoint, computed from the
shapes for the full-size DeepSeek-OCR and DeepSeek-OCR-2), prefill KL and greedy agreement on golden cases.

    python benchmarks/bench_recipes.py --ckpt /tmp/dsocr-golden-ckpt --golden ../shared/golden
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

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"  # the reference configs beside the checkout (../shared)

VARIANTS = {
    "float16": {},
    "q8": {"q_bits": 8},
    "mixed_4_8": {"q_recipe": "mixed_4_8"},
    "mixed_4_6": {"q_recipe": "mixed_4_6"},
    "q4": {"q_bits": 4},
    "mixed_3_6": {"q_recipe": "mixed_3_6"},
    "mixed_3_4": {"q_recipe": "mixed_3_4"},
    "mixed_2_6": {"q_recipe": "mixed_2_6"},
}


def computed_bytes(config: Path, kwargs: dict) -> int:
    """The weights' bytes of a conversion, from the shapes alone (float16 storage, affine group 64)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from dsocr_mlx.backends.mlx.model import Model
    from dsocr_mlx.backends.mlx.quantize import QuantPolicy, quantized_modules, recipe_policy
    from dsocr_mlx.config import ModelArgs

    args = ModelArgs.from_file(config)
    model = Model(args)
    policy = None
    if "q_recipe" in kwargs:
        policy = recipe_policy(kwargs["q_recipe"], 64)
    elif "q_bits" in kwargs:
        policy = QuantPolicy(bits=kwargs["q_bits"], group_size=64)
    modules = quantized_modules(model, policy) if policy else {}
    total = 0
    for key, value in tree_flatten(model.parameters()):
        path, leaf = key.rsplit(".", 1)
        n = value.size
        if leaf == "weight" and path in modules:
            p = modules[path]
            total += n * p["bits"] // 8 + 2 * (n // p["group_size"]) * 2
        else:
            total += n * (2 if mx.issubdtype(value.dtype, mx.floating) else value.itemsize)
    return total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--golden", required=True)
    ap.add_argument("--cases", default="p03,p05")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--work", default="/tmp/dsocr-recipes/work")
    ap.add_argument("--full-config", default=str(SHARED / "reference" / "config.json"))
    ap.add_argument("--full-config2", default=str(SHARED / "reference2" / "config.json"))
    ap.add_argument("--json", default=str(HERE / "results" / "quantization" / "recipes.json"))
    args = ap.parse_args()
    import mlx.core as mx

    golden = Path(args.golden)
    cases = {c["id"]: c for c in json.loads((golden / "cases.json").read_text())}
    rows, reference = [], {}
    for name, kwargs in VARIANTS.items():
        folder = Path(args.work) / name
        t = time.perf_counter()
        if not (folder / "config.json").is_file():
            convert(args.ckpt, folder, dtype="float16", overwrite=True, show_progress=False, **kwargs)
        convert_s = time.perf_counter() - t
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        model = dsocr_mlx.load(str(folder), dtype="float32" if mx.default_device() == mx.cpu else None)
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
        row = {
            "variant": name,
            "golden_bytes": size,
            "full_bytes": computed_bytes(Path(args.full_config), kwargs),
            "full2_bytes": computed_bytes(Path(args.full_config2), kwargs)
            if Path(args.full_config2).is_file()
            else None,
            "golden_computed_bytes": computed_bytes(Path(folder) / "config.json", kwargs),
            "kl": float(np.mean(kls)),
            "agreement": float(np.mean(agree)),
            "convert_s": convert_s,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"machine: {platform.machine()} {platform.system()}, mlx {mx.__version__}, device {mx.default_device()}")
    head = "| variant | golden ckpt | full DeepSeek-OCR (computed) | DeepSeek-OCR-2 (computed) |"
    print(head + " prefill KL vs float16 | greedy agreement |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        f2 = f"{r['full2_bytes'] / 1e9:.2f} GB" if r["full2_bytes"] else "-"
        sizes = f"{r['golden_bytes'] / 1e9:.2f} GB | {r['full_bytes'] / 1e9:.2f} GB | {f2}"
        print(f"| {r['variant']} | {sizes} | {r['kl']:.2e} | {100 * r['agreement']:.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
