"""dsocr-mlx side by side with its peers: mlx-vlm's ``deepseekocr`` port and the official HF reference code.

    python benchmarks/bench_peers.py setup [--reference-code DIR]     # once: two separate environments
    python benchmarks/bench_peers.py run --reference-code DIR         # the comparison (about 12 min here)
    python benchmarks/bench_peers.py run --device cuda                # ours (torch) vs official, bf16 on a GPU

Every implementation runs in its own process on the same random weights (by default the full-size
random checkpoint of ``dsocr make-test-model``), the same image, prompt, mode and number of generated
tokens (EOS ignored, greedy, no n-gram ban), in float32, with one warm-up and ``--trials`` timed runs.
With ``--device cuda`` the GPU runs are ours on PyTorch and the official code, both in bfloat16 (the
official inference dtype), on the same GPU in the same command.
mlx-vlm reads a folder made by its own converter; the official code reads the original layout and runs
on CPU from the ``.py`` files of the model's Hugging Face repo, which stay where they are (a temporary
copy is imported; nothing is copied into this repository). The peers live in their own virtual
environments under ``--envs`` (default ``~/.cache/dsocr/bench-peers``): this project never depends on them.

On Linux, MLX runs (ours and mlx-vlm) get OpenBLAS preloaded and torch runs (ours and the official code)
do not: each gets the BLAS it is fastest with (see README, "Benchmarks").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
MLX_VLM_REQUIREMENTS = ["mlx-vlm==0.7.10", "mlx[cpu]" if sys.platform == "linux" else "mlx"]
OFFICIAL_REQUIREMENTS = [
    "torch==2.13.0",
    "transformers==4.46.3",
    "tokenizers==0.20.3",
    "safetensors",
    "numpy",
    "pillow<13",
    "addict",
    "easydict",
    "einops",
    "tqdm",
    "requests",
]
OFFICIAL_REPO = "deepseek-ai/DeepSeek-OCR"
CODE_FILES = (
    "modeling_deepseekocr.py",
    "deepencoder.py",
    "modeling_deepseekv2.py",
    "configuration_deepseek_v2.py",
    "conversation.py",
)
# The ratios the benchmark issue aims at: (name, numerator, denominator, stage, higher_is_better, target).
TARGETS = [
    ("decode tok/s, ours MLX / mlx-vlm", "ours mlx", "mlx-vlm", "decode_tps", True, 1.3),
    ("vision, mlx-vlm / ours MLX", "ours mlx", "mlx-vlm", "vision_s", False, 1.5),
    ("time to first token, official / ours MLX", "ours mlx", "official", "ttft_s", False, 2.0),
    ("time to first token, official / ours torch", "ours torch", "official", "ttft_s", False, 2.0),
    ("decode tok/s, ours torch / official", "ours torch", "official", "decode_tps", True, None),
]
# On a GPU (the PyTorch backend issue): ratios, then absolute floors as (name, implementation, stage, floor).
CUDA_TARGETS = [
    ("decode tok/s, ours torch / official", "ours torch", "official", "decode_tps", True, 5.0),
    ("time to first token, official / ours torch", "ours torch", "official", "ttft_s", False, None),
    ("vision, official / ours torch", "ours torch", "official", "vision_s", False, None),
]
CUDA_FLOORS = [("decode tok/s at batch 1, ours torch", "ours torch", "decode_tps", 250.0)]


def default_envs() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsocr" / "bench-peers"


def env_python(envs: Path, name: str) -> Path:
    return envs / name / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- setup


def setup(envs: Path, reference_code: Path | None) -> None:
    """Create the two peer environments and fetch the official code when no folder is given."""
    for name, requirements in (("mlx-vlm", MLX_VLM_REQUIREMENTS), ("official", OFFICIAL_REQUIREMENTS)):
        python = env_python(envs, name)
        if not python.exists():
            log(f"creating {envs / name}")
            subprocess.run([sys.executable, "-m", "venv", str(envs / name)], check=True)
        log(f"installing {' '.join(requirements)} into {envs / name}")
        subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True)
    if reference_code is None:
        from huggingface_hub import hf_hub_download

        target = envs / "reference-code"
        log(f"downloading the official code of {OFFICIAL_REPO} into {target}")
        for name in CODE_FILES:
            hf_hub_download(OFFICIAL_REPO, name, local_dir=target)
    log("peers ready")


# ------------------------------------------------------------------------------------------------ run


def run_process(command: list[str], preload_openblas: bool) -> dict:
    """Run one implementation's timing script and read the JSON object it prints last."""
    env = dict(os.environ)
    kept = [p for p in env.get("LD_PRELOAD", "").split(":") if p and "openblas" not in p]
    if preload_openblas and sys.platform == "linux" and Path(OPENBLAS).exists():
        kept.append(OPENBLAS)
    env["LD_PRELOAD"] = ":".join(kept)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command[:2])} failed (exit {done.returncode}):\n{tail}")
    return json.loads(lines[-1])


def mlx_vlm_folder(envs: Path, checkpoint: Path) -> Path:
    """Convert ``checkpoint`` with mlx-vlm's own converter (float32), once per checkpoint."""
    key = hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest()[:12]
    out = envs / "converted" / f"{checkpoint.name}-{key}-float32"
    if (out / "config.json").exists():
        return out
    # mlx-community's DeepSeek-OCR folders name the model type "deepseekocr" (the HF repo says
    # deepseek_vl_v2, which mlx-vlm maps to another model): stage a view of the folder that does the same.
    stage = envs / "converted" / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for item in checkpoint.iterdir():
        if item.name != "config.json":
            (stage / item.name).symlink_to(item.resolve())
    config = json.loads((checkpoint / "config.json").read_text())
    (stage / "config.json").write_text(json.dumps({**config, "model_type": "deepseekocr"}, indent=1))
    if not (stage / "processor_config.json").exists():
        from dsocr_mlx.random_checkpoint import PROCESSOR_CONFIG

        (stage / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2))
    log(f"converting {checkpoint} with mlx-vlm's converter into {out}")
    subprocess.run(
        [
            str(env_python(envs, "mlx-vlm")),
            "-m",
            "mlx_vlm",
            "convert",
            "--hf-path",
            str(stage),
            "--mlx-path",
            str(out),
            "--dtype",
            "float32",
        ],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(stage)
    return out


def weights_gb(checkpoint: Path, dtype: str = "float32") -> float:
    """The model's weights in ``dtype``, in GB."""
    from dsocr_mlx.config import ModelArgs
    from dsocr_mlx.weights import checkpoint_shapes

    shapes = checkpoint_shapes(ModelArgs.from_file(checkpoint / "config.json"))
    return (4 if dtype == "float32" else 2) * sum(math.prod(s) for s in shapes.values()) / 1e9


def ratios(results: dict[str, dict], device: str = "cpu") -> list[dict]:
    """The target ratios, each > 1 when ours is better, for the implementations that ran (then, on a GPU,
    the absolute floors, in the row's own unit)."""
    on_gpu = device != "cpu"
    rows = []
    for name, ours, peer, stage, higher_is_better, target in CUDA_TARGETS if on_gpu else TARGETS:
        if ours in results and peer in results:
            a, b = results[ours]["median"][stage], results[peer]["median"][stage]
            value = a / b if higher_is_better else b / a
            rows.append(
                {"ratio": name, "value": value, "target": target, "met": None if target is None else value >= target}
            )
    for name, ours, stage, floor in CUDA_FLOORS if on_gpu else []:
        if ours in results:
            value = results[ours]["median"][stage]
            rows.append({"ratio": name, "value": value, "target": floor, "met": value >= floor, "unit": ""})
    return rows


def report(payload: dict) -> str:
    """The Markdown report: machine, settings, the stage table, memory and the ratios."""
    from dsocr_mlx.bench import markdown_table

    s = payload["settings"]
    results = list(payload["results"].values())
    dtype = s.get("dtype", "float32")
    weights = s["weights_gb"]
    lines = [
        f"Machine: {payload['machine']}",
        "",
        f"Model: {s['model']} ({weights:.2f} GB of weights in {dtype}); mode {s['mode']}; "
        f"{s['tokens']} generated tokens; {s['trials']} trials after one warm-up; {dtype} on "
        f"{s.get('device', 'cpu')}; prompt "
        f"`{s['prompt']!r}`; image {s['image']}.",
        "",
        "Versions: "
        + "; ".join(f"{r['name']}: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) for r in results),
        "",
        markdown_table(results),
        "",
        "| memory | " + " | ".join(r["name"] for r in results) + " |",
        "|" + " --- |" * (len(results) + 1),
        f"| peak / {dtype} weights | " + " | ".join(f"{r['peak_memory_gb'] / weights:.2f}x" for r in results) + " |",
        "",
        "| ratio (> 1: ours is better) | value | target | met |",
        "| --- | --- | --- | --- |",
    ]
    for row in payload["ratios"]:
        unit = row.get("unit", "x")
        target = "" if row["target"] is None else f"{row['target']:.1f}{unit}"
        met = "" if row["met"] is None else ("yes" if row["met"] else "no")
        lines.append(f"| {row['ratio']} | {row['value']:.2f}{unit} | {target} | {met} |")
    if payload["errors"]:
        lines += ["", "Failed: " + "; ".join(f"{k}: {v.splitlines()[0]}" for k, v in payload["errors"].items())]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from dsocr_mlx.bench import bar_chart, machine, page_image
    from dsocr_mlx.processing import MODES
    from dsocr_mlx.random_checkpoint import default_bench_checkpoint

    envs = args.envs
    out = args.out or HERE / "results" / ("peers" if args.device == "cpu" else "cuda")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.model) if args.model else default_bench_checkpoint()
    reference_code = args.reference_code or envs / "reference-code"
    image_path = out / "page.png"
    page_image().save(image_path)
    mode = MODES[args.mode]
    prompt = "<image>\nFree OCR."
    common = [
        "--image",
        str(image_path),
        "--prompt",
        prompt,
        "--base-size",
        str(mode.base_size),
        "--image-size",
        str(mode.image_size),
        "--tokens",
        str(args.tokens),
        "--trials",
        str(args.trials),
    ]
    common += ["--crop"] if mode.crop_mode else []
    on_gpu = args.device != "cpu"
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    # On a GPU only the torch implementations run: ours on PyTorch and the official code.
    ours_backends = [b for b in args.ours if b == "torch"] if on_gpu else args.ours
    peers = [p for p in args.peers if p == "official"] if on_gpu else args.peers
    torch_flags = ["--device", args.device, "--dtype", dtype]
    ours_common = [
        "--model",
        str(checkpoint),
        "--mode",
        args.mode,
        "--tokens",
        str(args.tokens),
        "--trials",
        str(args.trials),
        "--image",
        str(image_path),
    ]
    jobs = [
        (
            f"ours {backend}",
            lambda b=backend: run_process(
                [
                    sys.executable,
                    __file__,
                    "ours",
                    "--backend",
                    b,
                    *ours_common,
                    *(torch_flags if b == "torch" else ["--dtype", "float32"]),
                ],
                preload_openblas=b == "mlx",
            ),
        )
        for backend in ours_backends
    ]
    if "mlx-vlm" in peers:
        jobs.append(
            (
                "mlx-vlm",
                lambda: run_process(
                    [
                        str(env_python(envs, "mlx-vlm")),
                        str(HERE / "peers" / "mlx_vlm_stages.py"),
                        "--model",
                        str(mlx_vlm_folder(envs, checkpoint)),
                        *common,
                    ],
                    preload_openblas=True,
                ),
            )
        )
    if "official" in peers:
        jobs.append(
            (
                "official",
                lambda: run_process(
                    [
                        str(env_python(envs, "official")),
                        str(HERE / "peers" / "official_stages.py"),
                        "--code",
                        str(reference_code),
                        "--model",
                        str(checkpoint),
                        *common,
                        *torch_flags,
                    ],
                    preload_openblas=False,
                ),
            )
        )

    results, errors = {}, {}
    for name, job in jobs:
        log(f"running {name} ...")
        t = time.perf_counter()
        try:
            results[name] = {**job(), "name": name}
        except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
            errors[name] = str(e)
            log(f"  {name} failed: {e}")
            continue
        log(f"  done in {time.perf_counter() - t:.0f} s")
    host = machine()
    if on_gpu and results:
        host = next(iter(results.values())).get("machine", host)  # names the GPU
    payload = {
        "machine": host,
        "python": platform.python_version(),
        "settings": {
            "model": str(checkpoint),
            "mode": args.mode,
            "tokens": args.tokens,
            "trials": args.trials,
            "prompt": prompt,
            "image": list(page_image().size),
            "device": args.device,
            "dtype": dtype,
            "weights_gb": weights_gb(checkpoint, dtype),
        },
        "results": results,
        "ratios": ratios(results, args.device),
        "errors": errors,
    }
    (out / "peers.json").write_text(json.dumps(payload, indent=1))
    text = report(payload)
    (out / "peers.md").write_text(text)
    if results:
        bar_chart(list(results.values())).save(out / "peers.png")
    print(text)
    log(f"wrote {out / 'peers.json'}, {out / 'peers.md'}, {out / 'peers.png'}")
    return 1 if errors else 0


def ours(args: argparse.Namespace) -> None:
    """Our pipeline in this process (called by ``run`` once per backend)."""
    from PIL import Image

    from dsocr_mlx.bench import run_benchmark

    result = run_benchmark(
        args.model,
        backend=args.backend,
        dtype=args.dtype,
        mode=args.mode,
        tokens=args.tokens,
        trials=args.trials,
        image=Image.open(args.image).convert("RGB"),
        device=args.device if args.backend == "torch" else None,
    )
    result["versions"] = result["environment"]["versions"]
    result["machine"] = result["environment"]["machine"]
    print(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    set_up = commands.add_parser("setup", help="create the peer environments")
    set_up.add_argument("--envs", type=Path, default=default_envs())
    set_up.add_argument("--reference-code", type=Path, help="folder with the official .py files (else downloaded)")
    compare = commands.add_parser("run", help="run the comparison")
    compare.add_argument("--envs", type=Path, default=default_envs())
    compare.add_argument("--reference-code", type=Path, help="folder with the official .py files")
    compare.add_argument("--model", help="checkpoint in the original HF layout (default: full-size random)")
    compare.add_argument("--mode", default="base", choices=["tiny", "small", "base", "large", "gundam"])
    compare.add_argument("--tokens", type=int, default=32)
    compare.add_argument("--trials", type=int, default=2)
    compare.add_argument("--ours", nargs="*", default=["mlx", "torch"], choices=["mlx", "torch"])
    compare.add_argument("--peers", nargs="*", default=["mlx-vlm", "official"], choices=["mlx-vlm", "official"])
    compare.add_argument(
        "--device", default="cpu", help="cpu, or cuda / cuda:N: ours on torch vs the official code on that GPU"
    )
    compare.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="torch runs' dtype (default: float32 on cpu, bfloat16 on a GPU)",
    )
    compare.add_argument(
        "--out",
        type=Path,
        help="results folder (default: benchmarks/results/peers, or benchmarks/results/cuda with --device cuda)",
    )
    one = commands.add_parser("ours", help=argparse.SUPPRESS)
    one.add_argument("--backend", required=True)
    one.add_argument("--model", required=True)
    one.add_argument("--mode", required=True)
    one.add_argument("--tokens", type=int, required=True)
    one.add_argument("--trials", type=int, required=True)
    one.add_argument("--image", required=True)
    one.add_argument("--device", default="cpu")
    one.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    if args.command == "setup":
        setup(args.envs, args.reference_code)
    elif args.command == "ours":
        ours(args)
    else:
        return run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
