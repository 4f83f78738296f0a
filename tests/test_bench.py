"""``dsocr bench`` on the tiny checkpoint: every stage is timed and the three output files are written."""

from __future__ import annotations

import json

from PIL import Image
from typer.testing import CliRunner

from dsocr_mlx.bench import STAGES, page_image
from dsocr_mlx.cli import app


def test_bench_reports_every_stage_and_writes_outputs(tiny_ckpt, tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--model",
            str(tiny_ckpt),
            "--backend",
            "mlx",
            "--mode",
            "small",
            "--tokens",
            "4",
            "--trials",
            "1",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| decode (tok/s) |" in result.stdout and "mlx" in result.stdout
    data = json.loads((out / "bench.json").read_text())[0]
    assert data["settings"]["tokens"] == 4 and len(data["trials"]) == 1
    assert all(data["median"][stage] >= 0 for stage in STAGES) and data["median"]["decode_tps"] > 0
    assert data["median"]["image_tokens"] == 111 and data["peak_memory_gb"] > 0
    with Image.open(out / "bench.png") as chart:
        assert chart.size[0] > 100
    report = (out / "bench.md").read_text()
    assert "mode small, 4 tokens, 1 trials" in report and "\n| stage | mlx float32 |" in report


def test_page_image_is_deterministic():
    assert page_image().tobytes() == page_image().tobytes() and page_image().size == (1300, 1000)


def test_bench_times_tiles_and_the_pdf_benchmark(tiny_ckpt, tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--model",
            str(tiny_ckpt),
            "--mode",
            "gundam",
            "--tokens",
            "3",
            "--trials",
            "1",
            "--pdf-pages",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    median = json.loads((out / "bench.json").read_text())[0]["median"]
    assert median["tiles"] == 6 and median["vision_per_tile_s"] >= 0  # tiled 3 x 2; timings unasserted
    assert median["ttft_s"] >= median["vision_s"] + median["preprocess_s"]
    pdf = json.loads((out / "bench_pdf.json").read_text())
    assert "pages/minute" in result.stdout and pdf["settings"]["pages"] == 2 and pdf["pages_per_minute"] > 0
    assert 0 < pdf["generated_tokens"] <= 2 * 3


def test_markdown_table_names_peers_by_name():
    from dsocr_mlx.bench import markdown_table

    stages = dict.fromkeys(STAGES, 1.0)
    ours = {
        "environment": {"backend": "mlx", "dtype": "float32"},
        "load_s": 1.0,
        "peak_memory_gb": 2.0,
        "median": stages,
    }
    peer = {"name": "mlx-vlm", "load_s": 1.0, "peak_memory_gb": 2.0, "median": stages}
    assert markdown_table([ours, peer]).splitlines()[0] == "| stage | mlx float32 | mlx-vlm |"


def test_bench_batch_sizes_and_pdf_pages_per_minute(tiny_ckpt, tmp_path):
    out = tmp_path / "batches"
    args = ["bench", "--model", str(tiny_ckpt), "--backend", "mlx", "--tokens", "4", "--batch-size", "1,3"]
    result = CliRunner().invoke(app, [*args, "--pdf-pages", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| batch | decode tok/s (all rows) |" in result.stdout and "PDF pages/min" in result.stdout
    data = json.loads((out / "bench_batch.json").read_text())
    rows = data["decode"]["batches"]
    assert [r["batch"] for r in rows] == [1, 3] and all(r["decode_tps"] > 0 for r in rows)
    assert rows[0]["speedup"] == 1.0  # timings themselves unasserted
    assert [r["batch"] for r in data["pdf"]["batches"]] == [1, 3]
    assert all(0 < r["generated_tokens"] <= 3 * 4 for r in data["pdf"]["batches"])
    with Image.open(out / "bench_batch.png") as chart:
        assert chart.size[0] > 100
    bad = CliRunner().invoke(app, [*args[:-1], "1,zero"])
    assert bad.exit_code == 2 and "positive integers" in bad.stderr


def test_bench_runs_deepseek_ocr_2_in_its_official_mode(tiny_v2_ckpt, tmp_path):
    out = tmp_path / "bench2"
    args = ["bench", "--model", str(tiny_v2_ckpt), "--backend", "mlx", "--tokens", "2", "--trials", "1"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "bench.json").read_text())[0]
    # The 1300x1000 page: the 1024 global view (257 tokens) and 3x2 tiles of 768 (144 each).
    assert data["settings"]["mode"] == "default" and data["median"]["image_tokens"] == 257 + 6 * 144
    assert data["median"]["tiles"] == 6 and data["median"]["vision_per_tile_s"] > 0
    refused = CliRunner().invoke(app, [*args, "--mode", "tiny"])
    assert refused.exit_code == 2 and "default" in refused.output
