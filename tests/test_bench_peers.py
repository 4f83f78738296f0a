"""The peer comparison's bookkeeping: ratios point the right way and the report says what ran where."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from dsocr_mlx.bench import STAGES

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peers.py"


@pytest.fixture(scope="module")
def bench_peers():
    spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(name, **stages):
    median = {**dict.fromkeys(STAGES, 1.0), **stages}
    return {"name": name, "load_s": 1.0, "peak_memory_gb": 5.0, "median": median, "versions": {"x": "1"}}


def test_ratios_are_above_one_when_ours_is_better(bench_peers):
    results = {
        "ours mlx": result("ours mlx", decode_tps=20.0, vision_s=10.0, ttft_s=4.0),
        "mlx-vlm": result("mlx-vlm", decode_tps=10.0, vision_s=20.0),
        "official": result("official", ttft_s=6.0),
    }
    rows = {r["ratio"]: r for r in bench_peers.ratios(results)}
    assert rows["decode tok/s, ours MLX / mlx-vlm"]["value"] == pytest.approx(2.0)
    assert rows["vision, mlx-vlm / ours MLX"]["value"] == pytest.approx(2.0)
    assert rows["vision, mlx-vlm / ours MLX"]["met"] is True
    ttft = rows["time to first token, official / ours MLX"]
    assert ttft["value"] == pytest.approx(1.5) and ttft["met"] is False
    assert not any("torch" in name for name in rows)  # ours torch did not run


def test_report_names_machine_settings_memory_and_failures(bench_peers):
    results = {"ours mlx": result("ours mlx"), "mlx-vlm": result("mlx-vlm")}
    payload = {
        "machine": "Linux x86_64, Test CPU, 2 cores",
        "settings": {
            "model": "/m",
            "mode": "base",
            "tokens": 32,
            "trials": 2,
            "prompt": "<image>\nFree OCR.",
            "image": [1300, 1000],
            "weights_gb": 4.0,
        },
        "results": results,
        "ratios": bench_peers.ratios(results),
        "errors": {"official": "official_stages.py failed (exit 1):\nno module named torch"},
    }
    text = bench_peers.report(payload)
    assert text.startswith("Machine: Linux x86_64, Test CPU, 2 cores")
    assert "| stage | ours mlx | mlx-vlm |" in text and "| peak / float32 weights | 1.25x | 1.25x |" in text
    assert "Failed: official: official_stages.py failed (exit 1):" in text


def test_gpu_runs_compare_ours_torch_with_the_official_code(bench_peers):
    results = {
        "ours torch": result("ours torch", decode_tps=300.0, ttft_s=0.5, vision_s=0.2),
        "official": result("official", decode_tps=50.0, ttft_s=1.0, vision_s=0.3),
    }
    rows = {r["ratio"]: r for r in bench_peers.ratios(results, device="cuda")}
    decode = rows["decode tok/s, ours torch / official"]
    assert decode["value"] == pytest.approx(6.0) and decode["target"] == 5.0 and decode["met"] is True
    floor = rows["decode tok/s at batch 1, ours torch"]
    assert floor["value"] == 300.0 and floor["met"] is True
    assert "decode tok/s, ours MLX / mlx-vlm" not in rows
    payload = {
        "machine": "Linux x86_64, Test CPU, 16 cores, NVIDIA H100",
        "settings": {
            "model": "/m",
            "mode": "base",
            "tokens": 32,
            "trials": 2,
            "prompt": "<image>\nFree OCR.",
            "image": [1300, 1000],
            "device": "cuda",
            "dtype": "bfloat16",
            "weights_gb": 2.0,
        },
        "results": results,
        "ratios": bench_peers.ratios(results, device="cuda"),
        "errors": {},
    }
    text = bench_peers.report(payload)
    assert "bfloat16 on cuda" in text and "| peak / bfloat16 weights | 2.50x | 2.50x |" in text
    assert "| decode tok/s at batch 1, ours torch | 300.00 | 250.0 | yes |" in text
    assert "| decode tok/s, ours torch / official | 6.00x | 5.0x | yes |" in text
