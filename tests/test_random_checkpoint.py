"""The random-checkpoint generator: real names and shapes at every size, loadable as written."""

from __future__ import annotations

import dataclasses
import math

from dsocr_mlx.config import ModelArgs
from dsocr_mlx.random_checkpoint import full_args, tiny_args
from dsocr_mlx.weights import checkpoint_shapes


def test_full_preset_is_the_real_config(golden_dir):
    real = ModelArgs.from_file(golden_dir.parent / "reference" / "config.json")
    assert dataclasses.asdict(full_args()) == dataclasses.asdict(real)
    shapes = checkpoint_shapes(full_args())
    assert len(shapes) == 2710 and sum(math.prod(s) for s in shapes.values()) == 3_336_106_240


def test_golden_depth_preset_matches_the_golden_checkpoint(golden_dir):
    shapes = checkpoint_shapes(full_args(layers=3))
    assert len(shapes) == 892 and sum(math.prod(s) for s in shapes.values()) == 1_232_623_360


def test_tiny_preset_is_small_but_complete():
    shapes = checkpoint_shapes(tiny_args())
    params = sum(math.prod(s) for s in shapes.values())
    assert params < 20_000_000  # the two 129280-row tables dominate
    assert any(".mlp.experts.7." in k for k in shapes) and "model.layers.0.mlp.gate_proj.weight" in shapes
    assert shapes["model.sam_model.blocks.1.attn.rel_pos_h"][0] == 127  # global block: 2 * 64 - 1
    assert shapes["model.sam_model.blocks.0.attn.rel_pos_h"][0] == 27


def test_checkpoint_carries_the_real_processor_config(tiny_ckpt, golden_dir):
    import json

    real = json.loads((golden_dir.parent / "reference" / "processor_config.json").read_text())
    assert json.loads((tiny_ckpt / "processor_config.json").read_text()) == real
