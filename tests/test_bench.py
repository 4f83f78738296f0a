"""``dsocr bench`` on the tiny checkpoint: every stage is timed and the three output files are written."""

from __future__ import annotations

import json

from PIL import Image
from typer.testing import CliRunner

from dsocr_mlx.bench import STAGES, page_image
from dsocr_mlx.cli import app


def test_bench_reports_every_stage_and_writes_outputs(tiny_ckpt, tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--model", str(tiny_ckpt), "--mode", "small", "--tokens", "4",
                                      "--trials", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| decode (tok/s) |" in result.stdout and "mlx" in result.stdout
    data = json.loads((out / "bench.json").read_text())[0]
    assert data["settings"]["tokens"] == 4 and len(data["trials"]) == 1
    assert all(data["median"][stage] >= 0 for stage in STAGES) and data["median"]["decode_tps"] > 0
    assert data["median"]["image_tokens"] == 111 and data["peak_memory_gb"] > 0
    with Image.open(out / "bench.png") as chart:
        assert chart.size[0] > 100
    assert (out / "bench.md").read_text().startswith("| stage |")


def test_page_image_is_deterministic():
    assert page_image().tobytes() == page_image().tobytes() and page_image().size == (1300, 1000)
