"""DeepSeek-OCR-2's Qwen2 encoder against transformers' Qwen2 layers (the oracle), on tiny configs with the
official causal-flow mask, on both backends; and the mask itself."""

from __future__ import annotations

import numpy as np
import pytest

from dsocr_mlx.config import Qwen2EncoderArgs
from dsocr_mlx.random_checkpoint import random_tensor
from tests.conftest import assert_close
from tests.tolerances import COMPONENT

torch = pytest.importorskip("torch")
hf_qwen2 = pytest.importorskip("transformers.models.qwen2.modeling_qwen2")
from transformers import Qwen2Config  # noqa: E402

from dsocr_mlx.backends.torch import qwen2 as torch_qwen2  # noqa: E402

ARGS = Qwen2EncoderArgs(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96
)
N = 144  # one 768 tile: 12 x 12 SAM features, then 144 queries


def test_mask_is_the_official_one():
    allowed = torch_qwen2.causal_flow_allowed(3)
    # image tokens see the 3 image tokens only; query i sees every image token and queries 0..i
    assert allowed.astype(int).tolist() == [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ]
    mask = torch_qwen2.causal_flow_mask(3, torch.float32)
    assert mask.max() == 0 and mask.min() == torch.finfo(torch.float32).min  # finite minimum, not -inf
    assert torch.isfinite(mask).all()


def _weights() -> dict[str, np.ndarray]:
    d, hd, kv, f = ARGS.hidden_size, ARGS.head_dim, ARGS.num_key_value_heads, ARGS.intermediate_size
    shapes = {}
    for i in range(ARGS.num_hidden_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (d, d),
            p + "self_attn.q_proj.bias": (d,),
            p + "self_attn.k_proj.weight": (kv * hd, d),
            p + "self_attn.k_proj.bias": (kv * hd,),
            p + "self_attn.v_proj.weight": (kv * hd, d),
            p + "self_attn.v_proj.bias": (kv * hd,),
            p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        }
    shapes["norm.weight"] = (d,)
    return {k: random_tensor(k, s, seed=4) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def oracle():
    """Input features, queries, weights, and the query outputs of transformers' Qwen2 layers."""
    weights = _weights()
    rng = np.random.default_rng(0)
    features = rng.standard_normal((2, 12, 12, ARGS.hidden_size), dtype=np.float32)
    queries = rng.standard_normal((N, ARGS.hidden_size), dtype=np.float32)
    config = Qwen2Config(
        hidden_size=ARGS.hidden_size,
        intermediate_size=ARGS.intermediate_size,
        num_attention_heads=ARGS.num_attention_heads,
        num_key_value_heads=ARGS.num_key_value_heads,
        num_hidden_layers=ARGS.num_hidden_layers,
        rms_norm_eps=ARGS.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": ARGS.rope_theta},
        max_position_embeddings=4 * N,
        attn_implementation="eager",
    )
    layers = [hf_qwen2.Qwen2DecoderLayer(config, i).eval() for i in range(ARGS.num_hidden_layers)]
    for i, layer in enumerate(layers):
        prefix = f"layers.{i}."
        state = {k[len(prefix) :]: torch.from_numpy(v) for k, v in weights.items() if k.startswith(prefix)}
        layer.load_state_dict(state, strict=True)
    norm = hf_qwen2.Qwen2RMSNorm(ARGS.hidden_size, eps=ARGS.rms_norm_eps)
    norm.load_state_dict({"weight": torch.from_numpy(weights["norm.weight"])})
    rotary = hf_qwen2.Qwen2RotaryEmbedding(config)
    x = torch.cat([torch.from_numpy(features).reshape(2, N, -1), torch.from_numpy(queries)[None].expand(2, N, -1)], 1)
    positions = torch.arange(2 * N)[None]
    mask = torch_qwen2.causal_flow_mask(N, torch.float32)[None, None]
    with torch.inference_mode():
        cos_sin = rotary(x, positions)
        h = x
        for layer in layers:
            h = layer(h, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
            h = h[0] if isinstance(h, tuple) else h
        out = norm(h)[:, N:].numpy()
    return features, queries, weights, out


def _state(weights, queries) -> dict[str, np.ndarray]:
    state = {f"model.model.{k}": v for k, v in weights.items()}
    state["query_768.weight"] = queries
    state["query_1024.weight"] = np.zeros((256, ARGS.hidden_size), np.float32)
    return state


def test_torch_encoder_matches_transformers_qwen2(oracle):
    features, queries, weights, want = oracle
    encoder = torch_qwen2.Qwen2Encoder(ARGS).eval()
    encoder.load_state_dict({k: torch.from_numpy(v) for k, v in _state(weights, queries).items()}, strict=True)
    with torch.inference_mode():
        got = encoder(torch.from_numpy(features)).numpy()
    assert_close(got, want, **COMPONENT, what="torch Qwen2 encoder")


def test_mlx_encoder_matches_transformers_qwen2(oracle):
    mx = pytest.importorskip("mlx.core")
    from dsocr_mlx.backends.mlx import qwen2 as mlx_qwen2

    features, queries, weights, want = oracle
    encoder = mlx_qwen2.Qwen2Encoder(ARGS)
    encoder.load_weights([(k, mx.array(v)) for k, v in _state(weights, queries).items()], strict=True)
    got = np.array(encoder(mx.array(features)))
    assert_close(got, want, **COMPONENT, what="MLX Qwen2 encoder")


def test_mask_matters(oracle):
    """A plain causal mask (or none) changes the query outputs: the test above would catch it."""
    features, queries, weights, want = oracle
    encoder = torch_qwen2.Qwen2Encoder(ARGS).eval()
    encoder.load_state_dict({k: torch.from_numpy(v) for k, v in _state(weights, queries).items()}, strict=True)
    x = torch.cat([torch.from_numpy(features).reshape(2, N, -1), encoder.query_768.weight[None].expand(2, N, -1)], 1)
    causal = torch.full((2 * N, 2 * N), torch.finfo(torch.float32).min).triu(1)
    with torch.inference_mode():
        got = encoder.model(x, causal)[:, N:].numpy()
    assert np.abs(got - want).max() > 1e-2


def test_query_table_is_chosen_by_token_count():
    encoder = torch_qwen2.Qwen2Encoder(ARGS)
    assert encoder.queries(144) is encoder.query_768.weight and encoder.queries(256) is encoder.query_1024.weight
    with pytest.raises(ValueError, match="768 and 1024 pixels, not for a view of 100 tokens"):
        encoder.queries(100)
