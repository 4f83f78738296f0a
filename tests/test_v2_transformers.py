"""DeepSeek-OCR-2 against transformers 5's native port (``deepseek_ocr2``), a second reference that agrees
with the official code to its float32 noise (../shared/golden2/README.md): the same tiny random weights
give the same logits, and the folders transformers writes (``deepseek-community/DeepSeek-OCR-2``: its
config with the original tensor names, or its native names with fused experts) load on both backends."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import dsocr_mlx
from dsocr_mlx.config import ModelArgs, is_transformers_config
from dsocr_mlx.hub import describe_folder
from dsocr_mlx.weights import checkpoint_layout, checkpoint_shapes, from_transformers_shapes, safetensors_shapes
from tests.conftest import assert_close
from tests.tolerances import BACKENDS, LOGITS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekOcr2ForConditionalGeneration"):
    pytest.skip("transformers has no deepseek_ocr2 (needs 5.23 or later)", allow_module_level=True)


def transformers_config(args: ModelArgs) -> dict:
    """transformers' native config for ``args``, written as its conversion script writes the real one."""
    t, s, q = args.text, args.sam, args.qwen2
    layer_types = ["dense" if i < t.first_k_dense_replace else "sparse" for i in range(t.num_hidden_layers)]
    text = {
        k: getattr(t, k)
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "moe_intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "n_routed_experts",
            "n_shared_experts",
            "num_experts_per_tok",
            "max_position_embeddings",
            "bos_token_id",
            "eos_token_id",
            "rms_norm_eps",
        )
    }
    return {
        "model_type": "deepseek_ocr2",
        "architectures": ["DeepseekOcr2ForConditionalGeneration"],
        "image_token_id": args.image_token_id,
        "text_config": {**text, "mlp_layer_types": layer_types, "topk_method": "greedy", "n_group": 1},
        "vision_config": {
            "sam_config": {
                "hidden_size": s.width,
                "num_hidden_layers": s.layers,
                "num_attention_heads": s.heads,
                "global_attn_indexes": list(s.global_attn_indexes),
                "downsample_channels": list(s.downsample_channels),
                "output_channels": s.out_chans,
                "mlp_dim": s.mlp_dim,
            },
            "encoder_config": {
                "hidden_size": q.hidden_size,
                "num_hidden_layers": q.num_hidden_layers,
                "num_attention_heads": q.num_attention_heads,
                "num_key_value_heads": q.num_key_value_heads,
                "intermediate_size": q.intermediate_size,
                "rms_norm_eps": q.rms_norm_eps,
                "rope_theta": q.rope_theta,
                "vocab_size": 1,
            },
        },
    }


@pytest.fixture(scope="module")
def hf_folders(tiny_v2_ckpt, tmp_path_factory):
    """The tiny v2 checkpoint read by transformers (its conversion mapping), then saved both ways."""
    import json

    root = tmp_path_factory.mktemp("tf5")
    source = shutil.copytree(tiny_v2_ckpt, root / "source")
    config = transformers_config(ModelArgs.from_file(tiny_v2_ckpt / "config.json"))
    (source / "config.json").write_text(json.dumps(config))
    model = transformers.DeepseekOcr2ForConditionalGeneration.from_pretrained(str(source), dtype=torch.float32)
    folders = {}
    for name, original in (("community", True), ("native", False)):
        folders[name] = root / name
        model.save_pretrained(str(folders[name]), save_original_format=original)
        for f in tiny_v2_ckpt.iterdir():
            if f.name.startswith(("tokenizer", "processor")):
                shutil.copy(f, folders[name] / f.name)
    return model.eval(), folders


def test_config_translation(hf_folders, tiny_v2_ckpt):
    _, folders = hf_folders
    import json

    saved = json.loads((folders["community"] / "config.json").read_text())
    assert is_transformers_config(saved)
    ours = ModelArgs.from_file(tiny_v2_ckpt / "config.json")
    theirs = ModelArgs.from_dict(saved)
    assert theirs.is_v2
    for part in ("sam", "qwen2", "projector", "text"):
        assert getattr(theirs, part) == getattr(ours, part), part
    assert describe_folder(folders["native"]) == "DeepSeek-OCR-2, transformers"


def test_layouts_are_recognised(hf_folders, tiny_v2_ckpt):
    _, folders = hf_folders
    args = ModelArgs.from_file(tiny_v2_ckpt / "config.json")
    expected = checkpoint_shapes(args)
    community = safetensors_shapes(sorted(folders["community"].glob("*.safetensors")))
    assert checkpoint_layout(args, set(community)) == "hf" and community == expected
    native = safetensors_shapes(sorted(folders["native"].glob("*.safetensors")))
    assert checkpoint_layout(args, set(native)) == "transformers"
    assert any(k.endswith("experts.gate_up_proj") for k in native)
    assert from_transformers_shapes(native) == expected


def test_logits_match_transformers(hf_folders, tiny_v2_model, sample_image):
    """Our v2 model against transformers' on the same tiny weights and the same (official) pixels."""
    hf, _ = hf_folders
    inputs = tiny_v2_model.prepare(sample_image, "<image>\nFree OCR.")
    assert inputs.crop_pixels.shape[0] == 6
    with torch.inference_mode():
        out = hf(
            input_ids=torch.from_numpy(inputs.input_ids)[None],
            pixel_values=torch.from_numpy(inputs.global_pixels),
            pixel_values_local=torch.from_numpy(inputs.crop_pixels),
            num_local_patches=[inputs.crop_pixels.shape[0]],
        )
    assert_close(tiny_v2_model.prefill_logits(inputs), out.logits[0, -1].numpy(), **LOGITS, what="prefill logits")


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("name", ["community", "native"])
def test_transformers_folders_load(hf_folders, tiny_v2_model, sample_image, backend, name):
    _, folders = hf_folders
    model = dsocr_mlx.load(str(folders[name]), backend=backend, dtype="float32")
    assert model.family == "deepseek-ocr-2"
    inputs = tiny_v2_model.prepare(sample_image, "<image>\nFree OCR.")
    assert_close(model.prefill_logits(inputs), tiny_v2_model.prefill_logits(inputs), **BACKENDS, what=name)
    assert np.isfinite(model.image_embeddings(inputs)).all()
