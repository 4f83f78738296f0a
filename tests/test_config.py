"""ModelArgs: the real config.json reads as the real architecture, configs round-trip, and every
cross-tower invariant fails early with a message naming the numbers involved."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from dsocr_mlx.config import ClipArgs, ModelArgs, ProjectorArgs, SamArgs, TextArgs
from dsocr_mlx.random_checkpoint import full_args, tiny_args


@pytest.fixture(scope="module")
def real_config_path(golden_dir):
    path = golden_dir.parent / "reference" / "config.json"
    assert path.is_file(), f"{path} is missing"
    return path


@pytest.fixture(scope="module")
def real_args(real_config_path) -> ModelArgs:
    return ModelArgs.from_file(real_config_path)


def test_real_config_sam(real_args):
    s = real_args.sam
    assert (s.width, s.layers, s.heads) == (768, 12, 12)
    assert s.global_attn_indexes == (2, 5, 8, 11)
    assert s.window_size == 14
    assert (s.patch_size, s.image_size, s.grid) == (16, 1024, 64)
    assert s.mlp_dim == 3072  # vision_config.mlp_ratio 3.7362 is not SAM's: the official code hardcodes 4
    assert s.out_chans == 256
    assert s.downsample_channels == (512, 1024)
    assert s.output_channels == 1024
    assert s.layer_norm_eps == 1e-6


def test_real_config_clip_and_projector(real_args):
    c, p = real_args.clip, real_args.projector
    assert (c.width, c.layers, c.heads) == (1024, 24, 16)
    assert (c.intermediate_size, c.image_size, c.patch_size) == (4096, 224, 14)
    assert (c.grid, c.num_positions) == (16, 257)
    assert c.layer_norm_eps == 1e-5
    assert (p.input_dim, p.n_embed, p.projector_type) == (2048, 1280, "linear")


def test_real_config_text(real_args):
    t = real_args.text
    assert (t.hidden_size, t.num_hidden_layers) == (1280, 12)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (10, 10, 128)
    assert (t.intermediate_size, t.moe_intermediate_size) == (6848, 896)
    assert (t.n_routed_experts, t.num_experts_per_tok, t.n_shared_experts) == (64, 6, 2)
    assert t.norm_topk_prob is False
    assert t.first_k_dense_replace == 1
    assert t.use_mla is False
    assert (t.vocab_size, t.bos_token_id, t.eos_token_id) == (129280, 0, 1)
    assert (t.topk_method, t.scoring_func) == ("greedy", "softmax")
    assert t.rope_theta == 10000.0 and t.rms_norm_eps == 1e-6
    assert [t.is_moe_layer(i) for i in range(t.num_hidden_layers)] == [False] + [True] * 11
    assert real_args.image_token_id == 128815
    assert real_args.quantization is None and real_args.converted_format is None


def test_defaults_equal_real_config(real_args):
    assert ModelArgs() == real_args
    assert full_args() == real_args
    assert full_args(3).text.num_hidden_layers == 3


@pytest.mark.parametrize(
    "args",
    [tiny_args(), tiny_args(layers=3), full_args(), full_args(3), replace(tiny_args(), image_token_id=100)],
    ids=["tiny", "tiny3", "full", "full3", "tiny-custom"],
)
def test_to_hf_dict_round_trips(args):
    hf = args.to_hf_dict()
    assert ModelArgs.from_dict(hf) == args
    back = ModelArgs.from_dict(json.loads(json.dumps(hf)))  # through JSON: tuples come back as lists
    assert back == args
    assert back.sam.global_attn_indexes == args.sam.global_attn_indexes
    assert isinstance(back.sam.downsample_channels, tuple)


def test_to_hf_dict_round_trips_through_file(tmp_path):
    args = tiny_args()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(args.to_hf_dict()))
    assert ModelArgs.from_file(path) == args


def test_tiny_args_differs_from_full():
    # Guards the round-trip test above against comparing two defaults.
    tiny = tiny_args()
    assert tiny.sam.width == 32 and tiny.text.hidden_size == 64 and tiny != full_args()


def _assert_names(excinfo, *numbers):
    msg = str(excinfo.value)
    for n in numbers:
        assert str(n) in msg, f"{n!r} not named in: {msg}"


def test_sam_output_must_equal_clip_width():
    with pytest.raises(ValueError, match="CLIP width") as e:
        ModelArgs(sam=SamArgs(downsample_channels=(512, 768)))
    _assert_names(e, 768, 1024)


def test_projector_input_dim_must_match():
    with pytest.raises(ValueError, match="input_dim") as e:
        ModelArgs(projector=ProjectorArgs(input_dim=2000))
    _assert_names(e, 2000, 1024)


def test_n_embed_must_equal_hidden_size():
    with pytest.raises(ValueError, match="n_embed") as e:
        ModelArgs(projector=ProjectorArgs(n_embed=1024))
    _assert_names(e, 1024, 1280)


def test_sam_grid_must_match_clip_grid():
    with pytest.raises(ValueError, match="CLIP position grid") as e:
        ModelArgs(sam=SamArgs(image_size=512))
    _assert_names(e, 512, 8, 16)


def test_image_token_outside_vocab():
    with pytest.raises(ValueError, match="image_token_id") as e:
        ModelArgs(image_token_id=129280)
    _assert_names(e, 129280)


def test_use_mla_rejected():
    with pytest.raises(ValueError, match="use_mla"):
        TextArgs(use_mla=True)


@pytest.mark.parametrize("indexes, bad", [((2, 12), 12), ((-1, 5), -1), ((2, 5, 8, 40), 40)])
def test_bad_global_attn_indexes(indexes, bad):
    with pytest.raises(ValueError, match="global_attn_indexes") as e:
        SamArgs(global_attn_indexes=indexes)
    _assert_names(e, bad, "0..11")


@pytest.mark.parametrize(
    "make, numbers",
    [
        (lambda: SamArgs(heads=5), (768, 5)),
        (lambda: ClipArgs(heads=7), (1024, 7)),
        (lambda: TextArgs(num_attention_heads=3), (1280, 3)),
        (lambda: TextArgs(num_key_value_heads=4), (10, 4)),
    ],
    ids=["sam", "clip", "text", "text-kv"],
)
def test_heads_must_divide_width(make, numbers):
    with pytest.raises(ValueError, match="divisible|multiple") as e:
        make()
    _assert_names(e, *numbers)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"num_experts_per_tok": 65}, "num_experts_per_tok"),
        ({"topk_method": "group_limited_greedy"}, "routing"),
        ({"rope_scaling": {"type": "yarn"}}, "rope_scaling"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_text_options(kwargs, word):
    with pytest.raises(ValueError, match=word):
        TextArgs(**kwargs)


def _edited_config(real_config_path, tmp_path, edit) -> ModelArgs:
    data = json.loads(real_config_path.read_text())
    edit(data)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return ModelArgs.from_file(path)


def test_from_file_use_mla_true(real_config_path, tmp_path):
    with pytest.raises(ValueError, match="use_mla") as e:
        _edited_config(real_config_path, tmp_path, lambda d: d["language_config"].update(use_mla=True))
    assert "config.json" in str(e.value)  # the file is named


def test_from_file_language_config_overrides_top_level(real_config_path, tmp_path):
    def edit(d):
        d["language_config"]["num_hidden_layers"] = 3

    args = _edited_config(real_config_path, tmp_path, edit)
    assert args.text.num_hidden_layers == 3


def test_from_file_bad_tower_sizes(real_config_path, tmp_path):
    def edit(d):
        d["vision_config"]["width"]["sam_vit_b"]["global_attn_indexes"] = [2, 5, 8, 12]

    with pytest.raises(ValueError, match="global_attn_indexes") as e:
        _edited_config(real_config_path, tmp_path, edit)
    _assert_names(e, 12, "config.json")

    def edit_heads(d):
        d["vision_config"]["width"]["clip-l-14-224"]["heads"] = 15

    with pytest.raises(ValueError, match="divisible") as e:
        _edited_config(real_config_path, tmp_path, edit_heads)
    _assert_names(e, 1024, 15)


def test_from_file_missing(tmp_path):
    path = tmp_path / "nowhere" / "config.json"
    with pytest.raises(FileNotFoundError, match="config.json") as e:
        ModelArgs.from_file(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("text", ["{not json", "", '{"a": 1,}'])
def test_from_file_invalid_json(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="not valid JSON") as e:
        ModelArgs.from_file(path)
    assert str(path) in str(e.value)
