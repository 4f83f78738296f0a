"""dsocr-mlx side by side with its peers: mlx-vlm's ``deepseekocr`` / ``deepseekocr_2`` ports and the official
HF reference code.

    python benchmarks/bench_peers.py setup [--reference-code DIR]     # once: two separate environments
    python benchmarks/bench_peers.py run --reference-code DIR         # the comparison (about 12 min here)
    python benchmarks/bench_peers.py run --family deepseek-ocr-2      # DeepSeek-OCR-2: ours vs mlx-vlm
    python benchmarks/bench_peers.py run --device cuda                # ours (torch) vs official, bf16 on a GPU
    python benchmarks/bench_peers.py golden2 --ckpt DIR               # mlx-vlm's deepseekocr_2 vs the golden2 cases

Every implementation runs in its own process on the same random weights (by default the full-size
random checkpoint of ``dsocr make-test-model``), the same image, prompt, mode and number of generated
tokens (EOS ignored, greedy, no n-gram ban), in float32, with one warm-up and ``--trials`` timed runs.
The family (DeepSeek-OCR or DeepSeek-OCR-2) is read from the checkpoint's config.json. DeepSeek-OCR runs
in base mode unless ``--mode`` says otherwise; DeepSeek-OCR-2 in its one official mode, ``default``
(global view 1024 plus 2-6 tiles of 768, none when both sides are at most 768), which mlx-vlm's processor is
given explicitly (its own defaults allow a single tile). The official code runs for DeepSeek-OCR only.
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
# Pillow 13 changed bicubic resizing: the official preprocessing (and the golden pixels) is Pillow <= 12, so both
# peers get the Pillow that the official code ran with (mlx-vlm alone would take 13, which moves tile pixels).
MLX_VLM_REQUIREMENTS = ["mlx-vlm==0.7.10", "mlx[cpu]" if sys.platform == "linux" else "mlx", "pillow<13"]
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
    ("time to first token, mlx-vlm / ours MLX", "ours mlx", "mlx-vlm", "ttft_s", False, None),
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
# The model families (``dsocr_mlx.modes.OCR1`` / ``OCR2``), spelt out so that parsing needs no import.
OCR1, OCR2 = "deepseek-ocr", "deepseek-ocr-2"
# mlx-vlm picks its port by config.json's model_type; its converter must see these.
MLX_VLM_MODEL_TYPES = {OCR1: "deepseekocr", OCR2: "deepseekocr_2"}
# The mode a run uses without --mode: one 1024 view for DeepSeek-OCR, the one official mode for OCR-2.
BENCH_MODES = {OCR1: "base", OCR2: "default"}
# The peers with a runner for each family, and why the others are left out.
PEERS_BY_FAMILY = {OCR1: ("mlx-vlm", "official"), OCR2: ("mlx-vlm",)}
SKIPPED_PEERS = {
    OCR2: {"official": "not wired for DeepSeek-OCR-2 (official_stages.py runs the DeepSeek-OCR code)"},
}
# Where the benchmark's random checkpoints live in the user cache, per family.
BENCH_CHECKPOINTS = {OCR1: "random-full-seed0", OCR2: "random-full-v2-seed0"}
GOLDEN2 = HERE.parents[1] / "shared" / "golden2"  # ../shared/golden2 from the repository root


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsocr"


def default_envs() -> Path:
    return cache_dir() / "bench-peers"


def env_python(envs: Path, name: str) -> Path:
    return envs / name / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- setup


def setup(envs: Path, reference_code: Path | None, peers: tuple[str, ...] = ("mlx-vlm", "official")) -> None:
    """Create the peer environments and fetch the official code when no folder is given (and it is wanted)."""
    for name, requirements in (("mlx-vlm", MLX_VLM_REQUIREMENTS), ("official", OFFICIAL_REQUIREMENTS)):
        if name not in peers:
            continue
        python = env_python(envs, name)
        if not python.exists():
            log(f"creating {envs / name}")
            subprocess.run([sys.executable, "-m", "venv", str(envs / name)], check=True)
        log(f"installing {' '.join(requirements)} into {envs / name}")
        subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True)
    if reference_code is None and "official" in peers:
        from huggingface_hub import hf_hub_download

        target = envs / "reference-code"
        log(f"downloading the official code of {OFFICIAL_REPO} into {target}")
        for name in CODE_FILES:
            hf_hub_download(OFFICIAL_REPO, name, local_dir=target)
    log("peers ready")


# ------------------------------------------------------------------------------------------------ run


def process_env(preload_openblas: bool) -> dict[str, str]:
    """This process's environment with OpenBLAS preloaded (MLX runs on Linux) or not (torch runs)."""
    env = dict(os.environ)
    kept = [p for p in env.get("LD_PRELOAD", "").split(":") if p and "openblas" not in p]
    if preload_openblas and sys.platform == "linux" and Path(OPENBLAS).exists():
        kept.append(OPENBLAS)
    env["LD_PRELOAD"] = ":".join(kept)
    return env


def run_process(command: list[str], preload_openblas: bool) -> dict:
    """Run one implementation's timing script and read the JSON object it prints last."""
    done = subprocess.run(command, env=process_env(preload_openblas), capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command[:2])} failed (exit {done.returncode}):\n{tail}")
    return json.loads(lines[-1])


def staged_config(checkpoint: Path, model_type: str) -> dict:
    """``checkpoint``'s config.json as mlx-vlm's converter must see it: its port's model type, and no
    ``auto_map`` (the official upload's points at remote-code files a weights folder lacks; transformers would
    stop to ask whether to run them)."""
    config = json.loads((checkpoint / "config.json").read_text())
    config.pop("auto_map", None)
    return {**config, "model_type": model_type}


def mlx_vlm_folder(envs: Path, checkpoint: Path, model_type: str = "deepseekocr") -> Path:
    """Convert ``checkpoint`` with mlx-vlm's own converter (float32), once per checkpoint.

    ``model_type`` picks mlx-vlm's port: ``deepseekocr`` for DeepSeek-OCR, ``deepseekocr_2`` for OCR-2.
    """
    key = hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest()[:12]
    out = envs / "converted" / f"{checkpoint.name}-{key}-float32"
    if (out / "config.json").exists():
        if json.loads((out / "config.json").read_text()).get("model_type") == model_type:
            return out
        shutil.rmtree(out)  # converted for the other port
    # mlx-community's DeepSeek-OCR folders name the model type "deepseekocr" (DeepSeek-OCR-2's
    # "deepseekocr_2"); both HF repos say deepseek_vl_v2, which mlx-vlm maps to another model: stage a
    # view of the folder that does the same.
    stage = envs / "converted" / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for item in checkpoint.iterdir():
        if item.name != "config.json":
            (stage / item.name).symlink_to(item.resolve())
    (stage / "config.json").write_text(json.dumps(staged_config(checkpoint, model_type), indent=1))
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


def checkpoint_family(checkpoint: Path) -> str:
    """``deepseek-ocr`` or ``deepseek-ocr-2``, read from the checkpoint's config.json (never its folder name)."""
    from dsocr_mlx.config import ModelArgs

    return OCR2 if ModelArgs.from_file(checkpoint / "config.json").is_v2 else OCR1


def bench_checkpoint(family: str) -> Path:
    """The full-size random checkpoint of ``family`` in the user cache, written once (a minute or two)."""
    from dsocr_mlx.random_checkpoint import default_bench_checkpoint, full_v2_args, write_random_checkpoint

    if family == OCR1:
        return default_bench_checkpoint()
    base = cache_dir() / BENCH_CHECKPOINTS[family]
    if not (base / "config.json").is_file():
        log(f"writing a full-size random {family} checkpoint into {base} (once)")
        write_random_checkpoint(base, full_v2_args(), seed=0, overwrite=True)
    return base


def resolve_model(model: str | None, family: str | None) -> tuple[Path, str]:
    """The checkpoint and its family: ``model`` (its config.json says the family; ``family``, when given,
    must agree) or else the full-size random checkpoint of ``family`` (default DeepSeek-OCR)."""
    if model is None:
        family = family or OCR1
        return bench_checkpoint(family), family
    checkpoint = Path(model)
    found = checkpoint_family(checkpoint)
    if family is not None and family != found:
        raise ValueError(f"{checkpoint} holds a {found} model (its config.json says so), not {family}")
    return checkpoint, found


def resolve_mode(family: str, mode: str | None) -> str:
    """The mode a run of ``family`` uses (``mode``, else :data:`BENCH_MODES`); a mode of the other family is
    an error naming the valid ones."""
    from dsocr_mlx.modes import family_mode

    name = mode or BENCH_MODES[family]
    family_mode(family, name)
    return name


def tile_flags(family: str, mode: str) -> list[str]:
    """The tile bounds a DeepSeek-OCR-2 peer is told (mlx-vlm's processor defaults to 1-6 tiles, the official
    code 2-6); DeepSeek-OCR's peers keep their own (nothing passed)."""
    from dsocr_mlx.modes import family_mode

    if family != OCR2:
        return []
    m = family_mode(family, mode)
    return ["--min-tiles", str(m.min_tiles), "--max-tiles", str(m.max_tiles)] if m.crop_mode else []


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
    family = f"{s['family']}, " if s.get("family") else ""
    lines = [
        f"Machine: {payload['machine']}",
        "",
        f"Model: {s['model']} ({family}{weights:.2f} GB of weights in {dtype}); mode {s['mode']}; "
        f"{s['tokens']} generated tokens; {s['trials']} trials after one warm-up; {dtype} on "
        f"{s.get('device', 'cpu')}; prompt "
        f"`{s['prompt']!r}`; image {s['image']}.",
        "",
        "Versions: "
        + "; ".join(f"{r['name']}: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()) for r in results),
        "",
        "Inputs (what each implementation actually encoded): " + "; ".join(inputs_summary(r) for r in results),
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
    if payload.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in payload["skipped"].items())]
    if payload["errors"]:
        lines += ["", "Failed: " + "; ".join(f"{k}: {v.splitlines()[0]}" for k, v in payload["errors"].items())]
    return "\n".join(lines) + "\n"


def inputs_summary(result: dict) -> str:
    """``name: P prompt tokens (I image), T tiles`` from a result's medians, plus the processor settings a
    peer reports (mlx-vlm's tile bounds and grid), so that unequal work shows in the report."""
    median = result["median"]
    if "prompt_tokens" not in median:
        return f"{result['name']}: not reported"
    text = (
        f"{result['name']}: {int(median['prompt_tokens'])} prompt tokens ({int(median['image_tokens'])} image), "
        f"{int(median['tiles'])} tiles"
    )
    if result.get("inputs"):
        text += " (" + ", ".join(f"{k} {v}" for k, v in result["inputs"].items()) + ")"
    return text


def default_out(family: str, device: str) -> Path:
    """``benchmarks/results/peers`` (``cuda`` on a GPU), with ``-v2`` for DeepSeek-OCR-2."""
    return HERE / "results" / (("peers" if device == "cpu" else "cuda") + ("-v2" if family == OCR2 else ""))


def run(args: argparse.Namespace) -> int:
    from dsocr_mlx.bench import bar_chart, machine, page_image
    from dsocr_mlx.modes import family_mode

    envs = args.envs
    try:
        checkpoint, family = resolve_model(args.model, args.family)
        mode_name = resolve_mode(family, args.mode)
    except (ValueError, FileNotFoundError) as e:
        log(f"error: {e}")
        return 2
    out = args.out or default_out(family, args.device)
    out.mkdir(parents=True, exist_ok=True)
    reference_code = args.reference_code or envs / "reference-code"
    image_path = out / "page.png"
    page_image().save(image_path)
    mode = family_mode(family, mode_name)
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
    common += tile_flags(family, mode_name)
    on_gpu = args.device != "cpu"
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    # On a GPU only the torch implementations run: ours on PyTorch and the official code.
    ours_backends = [b for b in args.ours if b == "torch"] if on_gpu else args.ours
    peers = [p for p in args.peers if p == "official"] if on_gpu else args.peers
    skipped = {p: why for p, why in SKIPPED_PEERS.get(family, {}).items() if p in peers}
    peers = [p for p in peers if p in PEERS_BY_FAMILY[family]]
    for name, why in skipped.items():
        log(f"skipping {name}: {why}")
    torch_flags = ["--device", args.device, "--dtype", dtype]
    ours_common = [
        "--model",
        str(checkpoint),
        "--mode",
        mode_name,
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
                        str(mlx_vlm_folder(envs, checkpoint, MLX_VLM_MODEL_TYPES[family])),
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
            "family": family,
            "mode": mode_name,
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
        "skipped": skipped,
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


def golden2(args: argparse.Namespace) -> int:
    """mlx-vlm's ``deepseekocr_2`` port, on a folder its converter made from ``--ckpt``, against the golden2 cases."""
    try:
        family = checkpoint_family(args.ckpt)
    except (ValueError, FileNotFoundError) as e:
        log(f"error: {e}")
        return 2
    if family != OCR2:
        log(f"error: {args.ckpt} holds a {family} model; the golden2 cases are DeepSeek-OCR-2's")
        return 2
    if not (args.golden / "cases.json").is_file():
        log(f"error: no cases.json in {args.golden}")
        return 2
    folder = mlx_vlm_folder(args.envs, args.ckpt, MLX_VLM_MODEL_TYPES[OCR2])
    command = [str(env_python(args.envs, "mlx-vlm")), str(HERE / "peers" / "mlx_vlm_golden2.py")]
    command += ["--model", str(folder), "--golden", str(args.golden)]
    command += ["--cases", args.cases] if args.cases else []
    command += ["--json", str(args.json)] if args.json else []
    log(f"running {' '.join(command)}")
    return subprocess.run(command, env=process_env(preload_openblas=True)).returncode


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
    set_up.add_argument(
        "--peers", nargs="*", default=["mlx-vlm", "official"], choices=["mlx-vlm", "official"], help="which to set up"
    )
    compare = commands.add_parser("run", help="run the comparison")
    compare.add_argument("--envs", type=Path, default=default_envs())
    compare.add_argument("--reference-code", type=Path, help="folder with the official .py files")
    compare.add_argument(
        "--model",
        help="checkpoint in the original HF layout; its config.json gives the family (default: full-size random)",
    )
    compare.add_argument(
        "--family",
        choices=[OCR1, OCR2],
        help="without --model: the full-size random checkpoint of this family (default deepseek-ocr)",
    )
    compare.add_argument(
        "--mode",
        choices=["tiny", "small", "base", "large", "gundam", "default"],
        help="DeepSeek-OCR: tiny, small, base (default), large or gundam; DeepSeek-OCR-2: default (its only one)",
    )
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
        help="results folder (default: benchmarks/results/peers, or benchmarks/results/cuda with --device cuda; "
        "peers-v2 / cuda-v2 for DeepSeek-OCR-2)",
    )
    check = commands.add_parser("golden2", help="mlx-vlm's deepseekocr_2 port against the DeepSeek-OCR-2 golden cases")
    check.add_argument("--envs", type=Path, default=default_envs())
    check.add_argument("--golden", type=Path, default=GOLDEN2, help="the golden2 folder (cases.json, cases/*.npz)")
    check.add_argument(
        "--ckpt", type=Path, default=Path("/tmp/dsocr2-golden-ckpt"), help="the golden2 checkpoint, original layout"
    )
    check.add_argument("--cases", default="", help="comma-separated case ids (default: all)")
    check.add_argument("--json", type=Path, help="also write the per-case results here")
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
        setup(args.envs, args.reference_code, tuple(args.peers))
    elif args.command == "ours":
        ours(args)
    elif args.command == "golden2":
        return golden2(args)
    else:
        return run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
