"""Per-component float32 parity of the MLX modules against pip-installed torch oracles on the tiny config:
transformers' DeepSeek-OCR-2 SAM encoder and MoE text model, and its CLIP vision encoder layers."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dsocr_mlx.random_checkpoint import random_tensor, tiny_args
from dsocr_mlx.weights import checkpoint_shapes
from tests.conftest import assert_close
from tests.tolerances import COMPONENT, INTERPOLATION_ATOL, LOGITS, ROUTING_GAP, VISION

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
ocr2 = pytest.importorskip("transformers.models.deepseek_ocr2.modeling_deepseek_ocr2")
ocr2_config = pytest.importorskip("transformers.models.deepseek_ocr2.configuration_deepseek_ocr2")
hf_clip = pytest.importorskip("transformers.models.clip.modeling_clip")
hf_clip_config = pytest.importorskip("transformers.models.clip.configuration_clip")

from dsocr_mlx.backends.mlx import decoder as mlx_decoder  # noqa: E402
from dsocr_mlx.backends.mlx.model import Model  # noqa: E402
from dsocr_mlx.backends.mlx.sam import resize_grid_table  # noqa: E402

SEED = 11
SAM = "model.sam_model."
CLIP = "model.vision_model."


@pytest.fixture(scope="module")
def parity():
    """The tiny config, its raw float32 checkpoint (HF names) and our MLX model loaded from it."""
    args = tiny_args()
    raw = {name: random_tensor(name, shape, SEED) for name, shape in checkpoint_shapes(args).items()}
    model = Model(args)
    model.load_weights(list(Model.sanitize({k: mx.array(v) for k, v in raw.items()}).items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return args, raw, model


def _load(module, state: dict[str, np.ndarray]):
    """Load numpy tensors into a torch module (every parameter and persistent buffer must be given)."""
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
    return module.eval()


def _np(x) -> np.ndarray:
    return np.array(x.astype(mx.float32)) if isinstance(x, mx.array) else x.detach().float().numpy()


def _resize_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """``(G, G, C)`` -> ``(size, size, C)`` as the official ``get_abs_pos``: float32 bicubic, antialiased."""
    if table.shape[0] == size:
        return table
    t = table.permute(2, 0, 1)[None].float()
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return t[0].permute(1, 2, 0)


# ---------------------------------------------------------------- SAM

_SAM_RENAMES = [
    (r"^patch_embed\.proj\.", "patch_embed.projection."),
    (r"^blocks\.(\d+)\.norm([12])\.", r"layers.\1.layer_norm\2."),
    (r"^blocks\.", "layers."),
    (r"^neck\.0\.", "neck.conv1."),
    (r"^neck\.1\.", "neck.layer_norm1."),
    (r"^neck\.2\.", "neck.conv2."),
    (r"^neck\.3\.", "neck.layer_norm2."),
    (r"^net_2\.", "proj.conv1."),
    (r"^net_3\.", "proj.conv2."),
]


def _sam_oracle(args, raw):
    s = args.sam
    cfg = ocr2_config.DeepseekOcr2SamVisionConfig(
        hidden_size=s.width,
        output_channels=s.out_chans,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        image_size=s.image_size,
        patch_size=s.patch_size,
        window_size=s.window_size,
        global_attn_indexes=list(s.global_attn_indexes),
        downsample_channels=list(s.downsample_channels),
        mlp_ratio=s.mlp_ratio,
        layer_norm_eps=s.layer_norm_eps,
        hidden_act="gelu",  # exact erf GELU
        qkv_bias=True,
        use_abs_pos=True,
        use_rel_pos=True,
        attn_implementation="eager",
    )
    state = {}
    for name, value in raw.items():
        if name.startswith(SAM):
            key = name[len(SAM) :]
            for pattern, repl in _SAM_RENAMES:
                key = re.sub(pattern, repl, key)
            state[key] = value
    return _load(ocr2.DeepseekOcr2SamVisionEncoder(cfg), state)


@pytest.mark.parametrize("size", [512, 640, 1280])
def test_sam_encoder_matches_oracle(parity, oracles, size):
    """Whole SAM tower + neck + net_2/net_3, and each block alone on the oracle's own input. 512 and 640 px
    shrink the 64x64 position table (antialiased) and the 127-row global rel-pos tables, 1280 px enlarges them;
    every size pads the grid to windows of 14."""
    args, raw, model = parity
    grid = size // args.sam.patch_size
    assert grid % args.sam.window_size and grid != args.sam.grid  # padding and resizing are both exercised
    pixels = np.random.default_rng(size).uniform(-1, 1, (2 if size < 1024 else 1, size, size, 3)).astype(np.float32)
    sam = model.model.sam_model

    oracle, seen = oracles["sam"], {}
    hooks = [
        layer.register_forward_hook(lambda _m, inp, out, i=i: seen.__setitem__(i, (_np(inp[0]), _np(out))))
        for i, layer in enumerate(oracle.layers)
    ]
    try:
        with torch.no_grad():
            ref = oracle(torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state.permute(0, 2, 3, 1)
    finally:
        for hook in hooks:
            hook.remove()
    ours = _np(sam(mx.array(pixels)))
    assert ours.shape == (pixels.shape[0], size // 64, size // 64, args.sam.output_channels)
    assert np.abs(_np(ref)).mean() > 0.1  # a live signal, not a collapsed map
    assert_close(ours, _np(ref), **VISION, what=f"SAM output at {size} px")

    # Component level: the embeddings (patch conv + resized positions), then every block on the oracle's input.
    embedded = sam.patch_embed(mx.array(pixels))
    embedded = embedded + resize_grid_table(sam.pos_embed[0], grid)
    assert_close(_np(embedded), seen[0][0], **COMPONENT, what=f"SAM embeddings at {size} px")
    assert len(seen) == len(sam.blocks)
    for i, block in enumerate(sam.blocks):
        kind = "window" if block.window_size else "global"
        assert_close(_np(block(mx.array(seen[i][0]))), seen[i][1], **COMPONENT, what=f"SAM {kind} block {i}")


def test_sam_position_table_resize_matches_official(parity, oracles):
    """The oracle resizes pos_embed as the official get_abs_pos_sam does; so does ours, through its own path."""
    args, raw, model = parity
    oracle = oracles["sam"]
    table = torch.from_numpy(raw[SAM + "pos_embed"][0])
    for grid in (32, 40, 80):
        ref = _resize_table(table, grid)
        with torch.no_grad():
            hf = oracle.interpolate_pos_encoding(grid, grid)[0]
        assert_close(_np(hf), _np(ref), rtol=0, atol=0, what=f"oracle pos_embed at {grid}")
        ours = _np(resize_grid_table(model.model.sam_model.pos_embed[0], grid))
        assert_close(ours, _np(ref), rtol=0, atol=INTERPOLATION_ATOL, what=f"our pos_embed at {grid}")


# ---------------------------------------------------------------- CLIP


def _clip_oracle(args, raw):
    c = args.clip
    cfg = hf_clip_config.CLIPVisionConfig(
        hidden_size=c.width,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        image_size=c.image_size,
        patch_size=c.patch_size,
        num_channels=3,
        hidden_act="quick_gelu",
        layer_norm_eps=c.layer_norm_eps,
        attn_implementation="eager",
    )
    state = {
        "post_layernorm.weight": np.ones(c.width, np.float32),  # not in DeepSeek-OCR; unused here
        "post_layernorm.bias": np.zeros(c.width, np.float32),
    }
    for name, value in raw.items():
        if not name.startswith(CLIP):
            continue
        key = name[len(CLIP) :].replace("transformer.layers.", "encoder.layers.")
        if ".qkv_proj." in key:  # fused rows are [q; k; v]
            for part, chunk in zip("qkv", np.split(value, 3, axis=0)):
                state[key.replace("qkv_proj", f"{part}_proj")] = chunk
        else:
            state[key] = value
    return _load(hf_clip.CLIPVisionModel(cfg), state)


def _clip_reference(oracle, sam_map: np.ndarray) -> torch.Tensor:
    """Official VitModel.forward with patch_embeds given: [class; patches] + positions, pre-LN, encoder."""
    emb = oracle.embeddings
    B, g, _, C = sam_map.shape
    table = emb.position_embedding.weight
    grid = int(round((table.shape[0] - 1) ** 0.5))
    positions = _resize_table(table[1:].reshape(grid, grid, C), g).reshape(g * g, C)
    positions = torch.cat([table[:1], positions], dim=0)
    patches = torch.from_numpy(sam_map).reshape(B, g * g, C)
    x = torch.cat([emb.class_embedding.expand(B, 1, C), patches], dim=1) + positions
    return oracle.encoder(inputs_embeds=oracle.pre_layrnorm(x)).last_hidden_state


@pytest.mark.parametrize("grid", [8, 10, 16, 20])
def test_clip_tower_matches_oracle(parity, oracles, grid):
    """ClipVisionTower on a SAM-like map; grids 8/10/20 (512/640/1280 px) resize the 16x16 position table."""
    args, raw, model = parity
    sam_map = np.random.default_rng(grid).standard_normal((2, grid, grid, args.clip.width)).astype(np.float32)
    ours = _np(model.model.vision_model(mx.array(sam_map)))
    oracle = oracles["clip"]
    with torch.no_grad():
        ref = _np(_clip_reference(oracle, sam_map))
        if grid == args.clip.grid:  # the unresized path must equal HF's own embeddings module too
            hf = oracle.embeddings.position_embedding(oracle.embeddings.position_ids)[0]
            assert_close(
                hf.numpy(),
                raw[CLIP + "embeddings.position_embedding.weight"],
                rtol=0,
                atol=0,
                what="CLIP positions at grid 16",
            )
    assert ours.shape == (2, 1 + grid * grid, args.clip.width)
    assert_close(ours, ref, **VISION, what=f"CLIP output at grid {grid}")


# ---------------------------------------------------------------- projector and the composed view


def test_projector_matches_torch_linear(parity, oracles):
    args, _, model = parity
    x = np.random.default_rng(0).standard_normal((3, 5, args.projector.input_dim)).astype(np.float32)
    with torch.no_grad():
        ref = oracles["projector"](torch.from_numpy(x)).numpy()
    assert_close(_np(model.model.projector(mx.array(x))), ref, **COMPONENT, what="projector")


def test_encode_view_matches_composed_oracles(parity, oracles):
    """SAM -> CLIP (class token dropped) -> concat [CLIP, SAM] -> projector, as the official forward composes it."""
    _, _, model = parity
    pixels = np.random.default_rng(1).uniform(-1, 1, (1, 640, 640, 3)).astype(np.float32)
    ours = _np(model.model.encode_view(mx.array(pixels)))
    sam, clip, lin = oracles["sam"], oracles["clip"], oracles["projector"]
    with torch.no_grad():
        sam_map = sam(torch.from_numpy(pixels).permute(0, 3, 1, 2)).last_hidden_state  # (B, C, g, g)
        B, C, g, _ = sam_map.shape
        clip_out = _clip_reference(clip, sam_map.permute(0, 2, 3, 1).numpy())
        features = torch.cat([clip_out[:, 1:], sam_map.flatten(2).permute(0, 2, 1)], dim=-1)
        ref = lin(features).reshape(B, g, g, -1).numpy()
    assert_close(ours, ref, **VISION, what="encode_view")


# ---------------------------------------------------------------- decoder


def _text_oracle(args, raw):
    t = args.text
    assert not t.norm_topk_prob and t.topk_method == "greedy"  # the oracle router never renormalises
    cfg = ocr2_config.DeepseekOcr2TextConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        moe_intermediate_size=t.moe_intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        n_routed_experts=t.n_routed_experts,
        n_shared_experts=t.n_shared_experts,
        num_experts_per_tok=t.num_experts_per_tok,
        routed_scaling_factor=t.routed_scaling_factor,
        topk_method="greedy",
        rms_norm_eps=t.rms_norm_eps,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
        attention_bias=t.attention_bias,
        hidden_act="silu",
        tie_word_embeddings=False,
        attn_implementation="eager",
        mlp_layer_types=["sparse" if t.is_moe_layer(i) else "dense" for i in range(t.num_hidden_layers)],
    )
    state, experts = {}, {}
    for name, value in raw.items():
        m = re.match(r"^model\.(layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)_proj\.weight$", name)
        if m:
            experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = value
        elif name.startswith("model.") and not name.startswith(
            (
                "model.sam_model.",
                "model.vision_model.",
                "model.projector.",
                "model.image_newline",
                "model.view_seperator",
            )
        ):
            state[name[len("model.") :]] = value
    for prefix, by_key in experts.items():
        n = t.n_routed_experts
        state[prefix + ".gate_up_proj"] = np.stack(
            [np.concatenate([by_key[(e, "gate")], by_key[(e, "up")]], axis=0) for e in range(n)]
        )
        state[prefix + ".down_proj"] = np.stack([by_key[(e, "down")] for e in range(n)])
    body = _load(ocr2.DeepseekOcr2TextModel(cfg), state)
    head = _load(torch.nn.Linear(t.hidden_size, t.vocab_size, bias=False), {"weight": raw["lm_head.weight"]})
    return body, head


@pytest.fixture(scope="module")
def oracles(parity):
    """The torch oracles, built once from the same raw tensors."""
    args, raw, _ = parity
    p = args.projector
    projector = _load(
        torch.nn.Linear(p.input_dim, p.n_embed),
        {"weight": raw["model.projector.layers.weight"], "bias": raw["model.projector.layers.bias"]},
    )
    body, head = _text_oracle(args, raw)
    return {
        "sam": _sam_oracle(args, raw),
        "clip": _clip_oracle(args, raw),
        "projector": projector,
        "text": body,
        "lm_head": head,
    }


def _prompt(args, length: int = 24) -> np.ndarray:
    return np.random.default_rng(5).integers(0, args.text.vocab_size, (1, length)).astype(np.int64)


def test_decoder_logits_and_routing_match_oracle(parity, oracles, monkeypatch):
    """Full text-only forward: dense layer 0, MoE layer 1 (softmax top-3 of 8, raw weights, shared expert)."""
    args, _, model = parity
    ids = _prompt(args)
    body, head = oracles["text"], oracles["lm_head"]

    routed = {}
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda _m, _inp, out, i=i: routed.__setitem__(i, out))
        for i, layer in enumerate(body.layers)
        if args.text.is_moe_layer(i)
    ]
    try:
        with torch.no_grad():
            ref = head(body(input_ids=torch.from_numpy(ids)).last_hidden_state).numpy()
    finally:
        for hook in hooks:
            hook.remove()

    ours_routed = []
    original = mlx_decoder.MoEGate.__call__

    def recording(self, x):
        out = original(self, x)
        ours_routed.append(out)
        return out

    monkeypatch.setattr(mlx_decoder.MoEGate, "__call__", recording)
    ours = _np(model(mx.array(ids.astype(np.int32))))
    monkeypatch.undo()

    assert ours.shape == ref.shape == (1, ids.shape[1], args.text.vocab_size)
    assert ref.std() > 1.0  # peaky logits, as the real model's
    assert_close(ours, ref, **LOGITS, what="decoder logits")

    moe_layers = sorted(routed)
    assert moe_layers and len(ours_routed) == len(moe_layers)
    k = args.text.num_experts_per_tok
    for i, (indices, weights) in zip(moe_layers, ours_routed):
        logits, ref_weights, ref_indices = (r.numpy() for r in routed[i])
        scores = np.sort(torch.softmax(torch.from_numpy(logits), -1).numpy(), axis=-1)[:, ::-1]
        clear = scores[:, k - 1] - scores[:, k] > ROUTING_GAP  # ties may legitimately pick either expert
        assert clear.mean() > 0.9
        ours_sets = np.sort(np.array(indices).reshape(-1, k), axis=-1)
        ref_order = np.argsort(ref_indices, axis=-1)
        assert (ours_sets[clear] == np.take_along_axis(ref_indices, ref_order, -1)[clear]).all(), f"layer {i}"
        ours_w = np.take_along_axis(np.array(weights).reshape(-1, k), np.argsort(np.array(indices).reshape(-1, k)), -1)
        assert_close(
            ours_w[clear],
            np.take_along_axis(ref_weights, ref_order, -1)[clear],
            **COMPONENT,
            what=f"layer {i} routing weights",
        )


def test_decoder_cached_steps_match_oracle(parity, oracles):
    """Prefill then one token at a time through the KV cache (RoPE offsets) against the oracle's full pass."""
    args, _, model = parity
    ids = _prompt(args, 20)
    body, head = oracles["text"], oracles["lm_head"]
    with torch.no_grad():
        ref = head(body(input_ids=torch.from_numpy(ids)).last_hidden_state).numpy()[0]
    cache = model.make_cache()
    prefill = 16
    steps = [_np(model(mx.array(ids[:, :prefill].astype(np.int32)), cache=cache))[0, -1]]
    for pos in range(prefill, ids.shape[1]):
        steps.append(_np(model(mx.array(ids[:, pos : pos + 1].astype(np.int32)), cache=cache))[0, -1])
    assert_close(np.stack(steps), ref[prefill - 1 :], **LOGITS, what="cached decoding logits")


def test_norm_epsilons_match_oracle(parity, oracles):
    """Every norm on a tiny input (mean square ~1e-6), where eps 1e-6 vs 1e-5 changes the output by ~2x:
    SAM LayerNorm and LayerNorm2d (1e-6), CLIP pre-LN and layer LNs (1e-5), decoder RMSNorm (1e-6)."""
    _, _, model = parity
    m = model.model
    sam, clip, text = oracles["sam"], oracles["clip"], oracles["text"]
    pairs = [
        ("SAM block norm1", m.sam_model.blocks[0].norm1, sam.layers[0].layer_norm1, False),
        ("SAM global block norm2", m.sam_model.blocks[1].norm2, sam.layers[1].layer_norm2, False),
        ("SAM neck LayerNorm2d", m.sam_model.neck[1], sam.neck.layer_norm1, True),
        ("CLIP pre_layrnorm", m.vision_model.pre_layrnorm, clip.pre_layrnorm, False),
        (
            "CLIP layer_norm1",
            m.vision_model.transformer.layers[0].layer_norm1,
            clip.encoder.layers[0].layer_norm1,
            False,
        ),
        ("decoder input RMSNorm", m.layers[0].input_layernorm, text.layers[0].input_layernorm, False),
        ("decoder final RMSNorm", m.norm, text.norm, False),
    ]
    rng = np.random.default_rng(2)
    for what, ours, ref, channels_first in pairs:
        width = ref.weight.shape[0]
        x = (1e-3 * rng.standard_normal((2, 3, 3, width))).astype(np.float32)
        tx = torch.from_numpy(x)
        with torch.no_grad():
            expected = _np(ref(tx.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) if channels_first else ref(tx))
        assert_close(_np(ours(mx.array(x))), expected, **COMPONENT, what=what)
