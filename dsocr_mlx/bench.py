"""Per-stage timings of the public pipeline, for ``dsocr bench`` and ``benchmarks/``.

Stages: load, preprocessing, vision (global view and per tile), prefill, time to first token, decode
(a fixed number of tokens, EOS ignored), post-processing, peak memory. Results are plain dicts so the
same numbers go to a Markdown table, JSON and a PNG chart.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import __version__
from .modes import DEFAULT_MODE
from .options import OCROptions
from .pipeline import OCRModel

STAGES = (
    "preprocess_s",
    "vision_global_s",
    "vision_per_tile_s",
    "vision_s",
    "prefill_tps",
    "ttft_s",
    "decode_tps",
    "postprocess_s",
)


def page_image(width: int = 1300, height: int = 1000, seed: int = 0) -> Image.Image:
    """A deterministic page-like image (tiled in gundam mode)."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 240, np.uint8)
    for _ in range(width * height // 6500):
        y, x = rng.integers(0, height - 20), rng.integers(0, width - 100)
        img[y : y + 14, x : x + rng.integers(30, 100)] = rng.integers(0, 60)
    return Image.fromarray(img)


def peak_memory_gb(model: OCRModel) -> float:
    """Peak memory of the process: MLX's allocator peak where it tracks it (Metal), else resident set."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024**2 if sys.platform != "darwin" else 1024**3)
    if model.backend == "mlx":
        import mlx.core as mx

        if mx.metal.is_available():
            return mx.get_peak_memory() / 1e9
    if model.backend == "torch" and model.device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated(model.device) / 1e9
    return rss * 1.073741824  # GiB -> GB


def bench_options(mode: str | None, tokens: int) -> OCROptions:
    """Exactly ``tokens`` tokens of the free task: EOS, loop detection and the n-gram ban off."""
    return OCROptions(
        task="free",
        mode=mode,
        max_new_tokens=tokens,
        ignore_eos=True,
        detect_loops=False,
        retry_on_repetition=False,
        no_repeat_ngram_size=0,
    )


def resolve_mode(model: OCRModel, mode: str | None) -> str:
    """The mode's name on ``model`` (None: the model's official one); a mode of the other family is an error."""
    model.check_options(OCROptions(mode=mode))
    return mode or DEFAULT_MODE[model.family]


def time_once(model: OCRModel, image: Image.Image, options: OCROptions) -> dict[str, float]:
    """One run of every stage through :meth:`OCRModel.stream_ocr`, as ``dsocr ocr`` runs them.

    Time to first token is what a user waits for: preprocessing, vision, prefill and the first step.
    The global view is also encoded alone, so that the tiles' share of vision can be told apart.
    """
    inputs = model.prepare(image, options.prompt_text, options.mode)
    n_tiles = inputs.crop_pixels.shape[0]
    vision_global = None
    if n_tiles:
        model.clear_vision_cache()
        t = time.perf_counter()
        model.image_embeddings(
            replace(
                inputs, crop_pixels=inputs.crop_pixels[:0], images_spatial_crop=np.ones_like(inputs.images_spatial_crop)
            )
        )
        vision_global = time.perf_counter() - t
    model.clear_vision_cache()
    result = model.ocr(image, options=options)
    t = result.timings
    vision_global = t["vision"] if vision_global is None else vision_global
    return {
        "preprocess_s": t["preprocess"],
        "vision_global_s": vision_global,
        "vision_per_tile_s": max(t["vision"] - vision_global, 0.0) / n_tiles if n_tiles else 0.0,
        "vision_s": t["vision"],
        "prefill_tps": result.prompt_tokens / t["prefill"],
        "ttft_s": t["preprocess"] + t["first_token"],
        "decode_tps": t["generation_tps"],
        "postprocess_s": t["postprocess"],
        "prompt_tokens": result.prompt_tokens,
        "image_tokens": result.image_tokens,
        "tiles": n_tiles,
    }


def environment(model: OCRModel) -> dict[str, Any]:
    versions = {"python": sys.version.split()[0], "dsocr-mlx": __version__, "numpy": np.__version__}
    from importlib.metadata import PackageNotFoundError, version

    for name in ("mlx", "torch"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    host = machine()
    if model.device.startswith("cuda"):
        import torch

        host += f", {torch.cuda.get_device_name(model.device)}"
    return {
        "machine": host,
        "versions": versions,
        "backend": model.backend,
        "dtype": model.dtype,
        "device": model.device,
    }


def machine() -> str:
    """The host in words: OS, architecture, CPU model and core count."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess

        try:
            cpu = (
                subprocess.run(
                    ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
                ).stdout.strip()
                or cpu
            )
        except (OSError, subprocess.SubprocessError):
            pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores"


def label(result: dict[str, Any]) -> str:
    """A result's column name: a peer's name, else ``backend dtype``."""
    if "name" in result:
        return result["name"]
    env = result["environment"]
    device = f" {env['device']}" if env.get("device", "cpu").startswith("cuda") else ""
    return f"{env['backend']} {env['dtype']}{device}"


def run_benchmark(
    model_path: str,
    backend: str = "mlx",
    dtype: str | None = None,
    mode: str | None = None,
    tokens: int = 32,
    trials: int = 2,
    image: Image.Image | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Load, warm up once, then time ``trials`` runs; returns settings, environment, per-trial and median stages."""
    import dsocr_mlx

    options = bench_options(mode, tokens)  # a bad mode or token count fails before the model loads
    t = time.perf_counter()
    model = dsocr_mlx.load(model_path, backend=backend, dtype=dtype, device=device, options=options)
    load_s = time.perf_counter() - t
    mode = resolve_mode(model, mode)
    image = image or page_image()
    time_once(model, image, bench_options(mode, min(tokens, 4)))  # warm-up: kernels, allocator, caches
    runs = [time_once(model, image, bench_options(mode, tokens)) for _ in range(trials)]
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    weights_gb = sum(f.stat().st_size for f in Path(model.path).glob("*.safetensors")) / 1e9
    return {
        "settings": {
            "model": str(model_path),
            "family": model.args.family_name,
            "mode": mode,
            "tokens": tokens,
            "trials": trials,
            "image": list(image.size),
        },
        "environment": environment(model),
        "load_s": load_s,
        "peak_memory_gb": peak_memory_gb(model),
        "checkpoint_gb": weights_gb,
        "median": median,
        "trials": runs,
    }


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One column per result (e.g. per backend or peer), one row per stage."""
    head = "| stage | " + " | ".join(label(r) for r in results) + " |"
    lines = [head, "|" + " --- |" * (len(results) + 1)]
    rows = [("load (s)", lambda r: r["load_s"]), ("peak memory (GB)", lambda r: r["peak_memory_gb"])]
    rows += [(k.replace("_s", " (s)").replace("_tps", " (tok/s)"), lambda r, k=k: r["median"][k]) for k in STAGES]
    for row_name, get in rows:
        lines.append(f"| {row_name} | " + " | ".join(f"{get(r):.3f}" for r in results) + " |")
    return "\n".join(lines)


def describe(result: dict[str, Any]) -> str:
    """Machine, library versions and settings of one :func:`run_benchmark` result, in two lines."""
    env, s, median = result["environment"], result["settings"], result["median"]
    return (
        f"{env['machine']}; {', '.join(f'{k} {v}' for k, v in env['versions'].items())}\n"
        f"model {s['model']}, {env['backend']} {env['dtype']} on {env.get('device', 'cpu')}, mode {s['mode']}, "
        f"{s['tokens']} tokens, "
        f"{s['trials']} trials, prompt {int(median['prompt_tokens'])} tokens ({int(median['image_tokens'])} image)"
    )


def save_outputs(results: list[dict[str, Any]], out: Path) -> list[Path]:
    """``bench.json``, ``bench.md`` and ``bench.png`` (stage bars per result) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    (out / "bench.md").write_text("\n".join(describe(r) for r in results) + "\n\n" + markdown_table(results) + "\n")
    chart = out / "bench.png"
    bar_chart(results).save(chart)
    return [out / "bench.json", out / "bench.md", chart]


def bar_chart(results: list[dict[str, Any]]) -> Image.Image:
    """A small grouped bar chart of the speed stages (higher is better for tok/s; lower for seconds)."""
    stages = ["vision_s", "ttft_s", "prefill_tps", "decode_tps"]
    width, height, margin = 900, 120 + 110 * len(stages), 200
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    draw.text((10, 10), "dsocr bench (seconds: lower is better; tok/s: higher is better)", fill="black", font=font)
    x = 10
    for i, r in enumerate(results):  # legend
        draw.rectangle([x, 32, x + 12, 44], fill=colours[i % len(colours)])
        draw.text((x + 16, 32), label(r), fill="black", font=font)
        x += 30 + 7 * len(label(r))
    for s, stage in enumerate(stages):
        y = 60 + 110 * s
        draw.text((10, y + 30), stage, fill="black", font=font)
        top = max(r["median"][stage] for r in results) or 1.0
        for i, r in enumerate(results):
            value = r["median"][stage]
            length = int((width - margin - 80) * value / top)
            yy = y + i * (80 // max(len(results), 1))
            draw.rectangle([margin, yy, margin + length, yy + 14], fill=colours[i % len(colours)])
            draw.text((margin + length + 5, yy), f"{value:.2f}", fill="black", font=font)
    return img


def time_batch(model: OCRModel, images: list[Image.Image], options: OCROptions) -> dict[str, float]:
    """Decode speed of ``len(images)`` pages decoding together, each to exactly ``max_new_tokens`` tokens.

    The first step admits every page (vision and prefill); the steps after it are timed: their tokens
    per second, all rows together, are the aggregate decode speed.
    """
    from .engine import BatchEngine

    engine = BatchEngine(model, len(images))
    pages = [engine.submit(image, options=options) for image in images]
    first = engine.step()
    start, tokens = time.perf_counter(), 0
    while not all(p.done for p in pages):
        tokens += len(engine.step())
    elapsed = time.perf_counter() - start
    return {
        "batch": len(images),
        "decode_tps": tokens / elapsed,
        "per_row_tps": tokens / elapsed / len(images),
        "step_ms": 1000 * elapsed / max(tokens / len(images), 1),
        "first_step_s": sum(p.result.timings["first_token"] for p in pages) / len(pages) if first else 0.0,
    }


def run_batch_benchmark(
    model_path: str,
    backend: str = "mlx",
    dtype: str | None = None,
    mode: str | None = None,
    tokens: int = 32,
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16),
    device: str | None = None,
) -> dict[str, Any]:
    """Aggregate decode tokens/s at each batch size, on pages that differ (so their rows route to
    different experts, as real pages do). The mode defaults to the family's smallest (vision plays no
    part in the decode speed); images of 640x560 are tiled by neither family."""
    import dsocr_mlx

    checked = bench_options(mode, tokens)  # and a mode of the other family, once config.json is read
    model = dsocr_mlx.load(model_path, backend=backend, dtype=dtype, device=device, options=checked)
    mode = mode or {"deepseek-ocr": "tiny"}.get(model.family) or resolve_mode(model, None)
    options = bench_options(mode, tokens)
    images = [page_image(640, 560, seed=100 + i) for i in range(max(batch_sizes))]
    time_batch(model, images[:1], options.merged(max_new_tokens=min(tokens, 4)))  # warm-up
    rows = [time_batch(model, images[:b], options) for b in batch_sizes]
    one = next((r["decode_tps"] for r in rows if r["batch"] == 1), rows[0]["decode_tps"])
    for r in rows:
        r["speedup"] = r["decode_tps"] / one
    return {
        "settings": {"model": str(model_path), "family": model.args.family_name, "mode": mode, "tokens": tokens},
        "environment": environment(model),
        "peak_memory_gb": peak_memory_gb(model),
        "batches": rows,
    }


def batch_table(result: dict[str, Any], pdf: dict[str, Any] | None = None) -> str:
    """The batch sizes' aggregate decode speed (and PDF pages/minute) as a Markdown table, after a line
    naming the machine and settings."""
    env, s = result["environment"], result["settings"]
    pdf_at = {r["batch"]: r for r in (pdf or {}).get("batches", [])}
    head = "| batch | decode tok/s (all rows) | per row | step (ms) | vs batch 1 |"
    rule = "| --- | --- | --- | --- | --- |"
    if pdf_at:
        head, rule = head + " PDF pages/min |", rule + " --- |"
    lines = [
        f"{env['machine']}; {env['backend']} {env['dtype']} on {env.get('device', 'cpu')}; model {s['model']} "
        f"({s['family']}), mode {s['mode']}, {s['tokens']} tokens per row",
        "",
        head,
        rule,
    ]
    for r in result["batches"]:
        speed = f"{r['decode_tps']:.2f} | {r['per_row_tps']:.2f} | {r['step_ms']:.0f}"
        row = f"| {r['batch']} | {speed} | {r['speedup']:.2f}x |"
        if pdf_at:
            row += f" {pdf_at[r['batch']]['pages_per_minute']:.2f} |" if r["batch"] in pdf_at else " |"
        lines.append(row)
    return "\n".join(lines)


def save_batch_outputs(result: dict[str, Any], pdf: dict[str, Any] | None, out: Path) -> list[Path]:
    """``bench_batch.json``, ``bench_batch.md`` and ``bench_batch.png`` (speed against batch size) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_batch.json").write_text(json.dumps({"decode": result, "pdf": pdf}, indent=1))
    (out / "bench_batch.md").write_text(batch_table(result, pdf) + "\n")
    series = {"decode tok/s (all rows)": [(r["batch"], r["decode_tps"]) for r in result["batches"]]}
    if pdf:
        series["PDF pages/min"] = [(r["batch"], r["pages_per_minute"]) for r in pdf["batches"]]
    env = result["environment"]
    title = f"dsocr bench --batch-size: {env['backend']} {env['dtype']}, {result['settings']['family']}"
    line_chart(series, title, "batch size", "per second / per minute").save(out / "bench_batch.png")
    return [out / "bench_batch.json", out / "bench_batch.md", out / "bench_batch.png"]


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str) -> Image.Image:
    """A small line chart (one line per series of ``(x, y)`` points), e.g. tokens/s against batch size."""
    width, height, left, bottom = 760, 460, 70, 50
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    points = [p for line in series.values() for p in line]
    x_max = max((x for x, _ in points), default=1) or 1
    y_max = max((y for _, y in points), default=1) or 1
    plot_w, plot_h = width - left - 30, height - bottom - 60

    def at(x: float, y: float) -> tuple[int, int]:
        return left + int(plot_w * x / x_max), height - bottom - int(plot_h * y / y_max)

    draw.text((10, 10), title, fill="black", font=font)
    draw.line([at(0, 0), at(x_max, 0)], fill="black")
    draw.line([at(0, 0), at(0, y_max)], fill="black")
    for x in sorted({x for x, _ in points}):
        draw.text((at(x, 0)[0] - 4, height - bottom + 6), f"{x:g}", fill="black", font=font)
    for frac in (0.25, 0.5, 0.75, 1.0):
        draw.text((8, at(0, y_max * frac)[1] - 6), f"{y_max * frac:.1f}", fill="black", font=font)
    draw.text((width // 2 - 40, height - 22), xlabel, fill="black", font=font)
    draw.text((8, 30), ylabel, fill="black", font=font)
    for i, (name, line) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        draw.line([at(x, y) for x, y in sorted(line)], fill=colour, width=3)
        for x, y in line:
            cx, cy = at(x, y)
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
        draw.text((width - 200, 40 + 16 * i), name, fill=colour, font=font)
    return img


def run_pdf_benchmark(
    model_path: str,
    backend: str = "mlx",
    dtype: str | None = None,
    mode: str | None = None,
    pages: int = 4,
    tokens: int = 64,
    work_dir: Path | None = None,
    device: str | None = None,
    batch_sizes: tuple[int, ...] = (1,),
) -> dict[str, Any]:
    """Pages per minute end to end: a ``pages``-page PDF through :meth:`OCRModel.ocr_many`, at each batch size.

    Every page is rendered, preprocessed, encoded and decoded up to ``tokens`` tokens (the official PDF
    n-gram ban on), as ``dsocr ocr file.pdf`` does, after one untimed warm-up page outside the PDF. The
    first batch size's figures are also the result's top-level ones.
    """
    import tempfile

    import dsocr_mlx

    from .pdf import save_images_as_pdf

    checked = OCROptions(mode=mode, max_new_tokens=tokens)  # a bad mode or token count fails before the load
    model = dsocr_mlx.load(model_path, backend=backend, dtype=dtype, device=device, options=checked)
    mode = resolve_mode(model, mode)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        path = Path(tmp) / "pages.pdf"
        save_images_as_pdf([page_image(seed=i) for i in range(pages)], path)
        options = OCROptions(mode=mode, max_new_tokens=tokens, detect_loops=False, retry_on_repetition=False)
        model.ocr(page_image(seed=pages), options=options.merged(max_new_tokens=min(tokens, 4)))  # warm-up
        runs = []
        for batch in batch_sizes:
            t = time.perf_counter()
            results = list(model.ocr_many([path], options=options, batch_size=batch))
            elapsed = time.perf_counter() - t
            runs.append(
                {
                    "batch": batch,
                    "seconds": elapsed,
                    "pages_per_minute": 60 * len(results) / elapsed,
                    "generated_tokens": sum(r.generated_tokens for r in results),
                }
            )
    return {
        "settings": {"model": str(model_path), "mode": mode, "pages": pages, "max_tokens": tokens},
        "environment": environment(model),
        **{k: v for k, v in runs[0].items() if k != "batch"},
        "batches": runs,
        "peak_memory_gb": peak_memory_gb(model),
    }
