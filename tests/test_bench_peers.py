"""The peer comparison's bookkeeping: ratios point the right way and the report says what ran where."""

from __future__ import annotations

import importlib.util
import json
import sys
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


# ------------------------------------------------------------------------------------- DeepSeek-OCR-2


def write_config(folder: Path, v2: bool) -> Path:
    from dsocr_mlx.config import ModelArgs

    folder.mkdir(parents=True)
    args = ModelArgs.v2() if v2 else ModelArgs()
    (folder / "config.json").write_text(json.dumps(args.to_hf_dict()))
    return folder


def test_the_family_comes_from_config_json_not_the_folder_name(bench_peers, tmp_path):
    v2 = write_config(tmp_path / "DeepSeek-OCR", v2=True)
    v1 = write_config(tmp_path / "DeepSeek-OCR-2", v2=False)
    assert bench_peers.checkpoint_family(v2) == "deepseek-ocr-2"
    assert bench_peers.checkpoint_family(v1) == "deepseek-ocr"
    assert bench_peers.resolve_model(str(v2), None) == (v2, "deepseek-ocr-2")
    assert bench_peers.resolve_model(str(v2), "deepseek-ocr-2") == (v2, "deepseek-ocr-2")
    with pytest.raises(ValueError, match="holds a deepseek-ocr model"):
        bench_peers.resolve_model(str(v1), "deepseek-ocr-2")


def test_without_model_the_family_picks_its_random_checkpoint(bench_peers, monkeypatch):
    monkeypatch.setattr(bench_peers, "bench_checkpoint", lambda family: Path(f"/cache/{family}"))
    assert bench_peers.resolve_model(None, None) == (Path("/cache/deepseek-ocr"), "deepseek-ocr")
    assert bench_peers.resolve_model(None, "deepseek-ocr-2") == (Path("/cache/deepseek-ocr-2"), "deepseek-ocr-2")


def test_the_v2_random_checkpoint_is_full_size_and_written_once(bench_peers, monkeypatch, tmp_path):
    import dsocr_mlx.random_checkpoint as rc

    calls = []

    def fake_write(out, args, seed=0, overwrite=False):
        calls.append((Path(out), args, seed))
        write_config(Path(out), v2=args.is_v2)

    monkeypatch.setattr(bench_peers, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(rc, "write_random_checkpoint", fake_write)
    monkeypatch.setattr(rc, "default_bench_checkpoint", lambda: Path("/v1"))
    first = bench_peers.bench_checkpoint("deepseek-ocr-2")
    assert bench_peers.bench_checkpoint("deepseek-ocr-2") == first == tmp_path / "random-full-v2-seed0"
    assert len(calls) == 1
    _, args, seed = calls[0]
    assert args == rc.full_v2_args() and args.is_v2 and args.text.num_hidden_layers == 12 and seed == 0
    assert bench_peers.bench_checkpoint("deepseek-ocr") == Path("/v1")  # v1 keeps dsocr_mlx's default


def test_modes_default_per_family_and_refuse_the_other_familys(bench_peers):
    assert bench_peers.resolve_mode("deepseek-ocr", None) == "base"
    assert bench_peers.resolve_mode("deepseek-ocr", "gundam") == "gundam"
    assert bench_peers.resolve_mode("deepseek-ocr-2", None) == "default"
    with pytest.raises(ValueError, match="its only mode is 'default'"):
        bench_peers.resolve_mode("deepseek-ocr-2", "gundam")
    with pytest.raises(ValueError, match="no mode 'default'"):
        bench_peers.resolve_mode("deepseek-ocr", "default")
    # mlx-vlm's DeepSeek-OCR-2 processor is told the official 2-6 tiles; DeepSeek-OCR's peers get nothing new.
    assert bench_peers.tile_flags("deepseek-ocr-2", "default") == ["--min-tiles", "2", "--max-tiles", "6"]
    assert bench_peers.tile_flags("deepseek-ocr", "gundam") == []
    assert bench_peers.default_out("deepseek-ocr-2", "cpu").name == "peers-v2"
    assert bench_peers.default_out("deepseek-ocr", "cpu").name == "peers"
    assert bench_peers.default_out("deepseek-ocr", "cuda").name == "cuda"


def test_mlx_vlm_converter_sees_its_ports_model_type(bench_peers, monkeypatch, tmp_path):
    checkpoint = write_config(tmp_path / "ckpt", v2=True)
    config = json.loads((checkpoint / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_deepseekocr2.DeepseekOCR2ForCausalLM"}
    (checkpoint / "config.json").write_text(json.dumps(config))
    (checkpoint / "model.safetensors").write_bytes(b"")
    staged = bench_peers.staged_config(checkpoint, "deepseekocr_2")
    assert staged["model_type"] == "deepseekocr_2" and "auto_map" not in staged
    assert staged["vision_config"] == config["vision_config"]

    seen = []

    def fake_convert(command, check, capture_output):
        stage = Path(command[command.index("--hf-path") + 1])
        out = Path(command[command.index("--mlx-path") + 1])
        seen.append(json.loads((stage / "config.json").read_text())["model_type"])
        assert (stage / "model.safetensors").is_symlink() and (stage / "processor_config.json").is_file()
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"model_type": seen[-1]}))

    monkeypatch.setattr(bench_peers.subprocess, "run", fake_convert)
    out = bench_peers.mlx_vlm_folder(tmp_path / "envs", checkpoint, "deepseekocr_2")
    assert bench_peers.mlx_vlm_folder(tmp_path / "envs", checkpoint, "deepseekocr_2") == out
    assert seen == ["deepseekocr_2"]  # converted once
    bench_peers.mlx_vlm_folder(tmp_path / "envs", checkpoint, "deepseekocr")
    assert seen == ["deepseekocr_2", "deepseekocr"]  # a folder made for the other port is redone


def test_golden2_refuses_a_deepseek_ocr_checkpoint(bench_peers, tmp_path):
    import argparse

    v1 = write_config(tmp_path / "v1", v2=False)
    args = argparse.Namespace(envs=tmp_path, ckpt=v1, golden=tmp_path, cases="", json=None)
    assert bench_peers.golden2(args) == 2
    v2 = write_config(tmp_path / "v2", v2=True)
    assert bench_peers.golden2(argparse.Namespace(**{**vars(args), "ckpt": v2})) == 2  # no cases.json there


def test_v2_report_says_family_inputs_and_skipped_peers(bench_peers):
    ours = result("ours mlx", prompt_tokens=1126.0, image_tokens=1121.0, tiles=6.0)
    peer = {
        **result("mlx-vlm", prompt_tokens=1126.0, image_tokens=1121.0, tiles=6.0),
        "inputs": {"processor": "cropping=True min_patches=2 max_patches=6", "grid": [[3, 2]]},
    }
    results = {"ours mlx": ours, "mlx-vlm": peer}
    payload = {
        "machine": "Linux x86_64, Test CPU, 2 cores",
        "settings": {
            "model": "/m",
            "family": "deepseek-ocr-2",
            "mode": "default",
            "tokens": 32,
            "trials": 2,
            "prompt": "<image>\nFree OCR.",
            "image": [1300, 1000],
            "weights_gb": 4.0,
        },
        "results": results,
        "ratios": bench_peers.ratios(results),
        "skipped": {"official": "not wired for DeepSeek-OCR-2"},
        "errors": {},
    }
    text = bench_peers.report(payload)
    assert "Model: /m (deepseek-ocr-2, 4.00 GB of weights in float32); mode default;" in text
    assert "ours mlx: 1126 prompt tokens (1121 image), 6 tiles;" in text
    assert "mlx-vlm: 1126 prompt tokens (1121 image), 6 tiles (processor cropping=True min_patches=2" in text
    assert "Skipped: official: not wired for DeepSeek-OCR-2" in text
    assert "| decode tok/s, ours MLX / mlx-vlm |" in text and "| time to first token, mlx-vlm / ours MLX |" in text


@pytest.fixture(scope="module")
def mlx_vlm_stages():
    pytest.importorskip("mlx.core")
    sys.path.insert(0, str(SCRIPT.parent / "peers"))
    try:
        spec = importlib.util.spec_from_file_location("mlx_vlm_stages", SCRIPT.parent / "peers" / "mlx_vlm_stages.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent / "peers"))
    return module


def test_mlx_vlm_v2_processor_gets_the_official_tiling(mlx_vlm_stages):
    from PIL import Image

    page, small = Image.new("RGB", (1300, 1000)), Image.new("RGB", (768, 700))
    v2 = mlx_vlm_stages.processor_kwargs(page, 1024, 768, True, 2, 6)
    assert v2 == {"base_size": 1024, "image_size": 768, "cropping": True, "min_patches": 2, "max_patches": 6}
    assert mlx_vlm_stages.processor_kwargs(small, 1024, 768, True, 2, 6)["cropping"] is False  # both sides <= 768
    v1 = mlx_vlm_stages.processor_kwargs(page, 1024, 640, True)
    assert v1 == {"base_size": 1024, "image_size": 640, "cropping": True}  # DeepSeek-OCR: as before

    import mlx.core as mx

    tiles = {"images": [mx.zeros((3, 3, 8, 8)), None], "images_spatial_crop": mx.array([[3, 1]])}
    assert mlx_vlm_stages.count_tiles(tiles, v2) == 3
    one = {"images": [mx.zeros((1, 3, 8, 8)), None], "images_spatial_crop": mx.array([[1, 1]])}
    assert mlx_vlm_stages.count_tiles(one, v2) == 1  # a single tile counts for OCR-2 ...
    assert mlx_vlm_stages.count_tiles(one, v1) == 0  # ... DeepSeek-OCR's 1x1 grid means none
    assert mlx_vlm_stages.count_tiles(one, {**v2, "cropping": False}) == 0


def test_peer_summary_carries_the_processor_inputs(capsys):
    sys.path.insert(0, str(SCRIPT.parent / "peers"))
    try:
        from stages import print_summary
    finally:
        sys.path.remove(str(SCRIPT.parent / "peers"))
    runs = [dict.fromkeys(STAGES, 1.0), dict.fromkeys(STAGES, 3.0)]
    print_summary("mlx-vlm", {"mlx-vlm": "0.7.10"}, 1.0, 2.0, runs, {"grid": [[3, 2]]})
    out = json.loads(capsys.readouterr().out)
    assert out["inputs"] == {"grid": [[3, 2]]} and out["median"]["decode_tps"] == 2.0
    print_summary("official", {}, 1.0, 2.0, runs)
    assert "inputs" not in json.loads(capsys.readouterr().out)
