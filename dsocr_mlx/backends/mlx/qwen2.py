"""DeepSeek-OCR-2's Qwen2-0.5B used as a vision encoder ("visual causal flow"), in MLX.

The SAM feature map (one token per feature) is followed by as many learnt queries. Image tokens attend
to every image token and no query; query i attends to every image token and to queries 0..i. Only
the query outputs are kept. Module names follow the checkpoint: ``qwen2_model.model.model.layers``.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...config import QUERY_VIEWS, Qwen2EncoderArgs


@lru_cache(maxsize=8)
def causal_flow_allowed(n: int) -> np.ndarray:
    """``(2n, 2n)`` bool: which keys each position may attend to (``n`` image tokens, then ``n`` queries)."""
    allowed = np.zeros((2 * n, 2 * n), dtype=bool)
    allowed[:, :n] = True  # everyone sees every image token
    allowed[n:, n:] = np.tril(np.ones((n, n), dtype=bool))  # query i sees queries 0..i
    return allowed


def causal_flow_mask(n: int, dtype: mx.Dtype) -> mx.array:
    """The official additive mask: 0 where allowed, the dtype's most negative finite value elsewhere."""
    return mx.where(mx.array(causal_flow_allowed(n)), mx.array(0.0, dtype), mx.array(mx.finfo(dtype).min, dtype))


class Attention(nn.Module):
    """Grouped-query attention with q/k/v biases and half-split RoPE (Qwen2)."""

    def __init__(self, args: Qwen2EncoderArgs):
        super().__init__()
        d, hd = args.hidden_size, args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, hd
        self.rope_theta = args.rope_theta
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=True)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=0)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=0)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: Qwen2EncoderArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    def __init__(self, args: Qwen2EncoderArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Body(nn.Module):
    """``qwen2_model.model.model``: the layers and the final norm (no token embeddings)."""

    def __init__(self, args: Qwen2EncoderArgs):
        super().__init__()
        self.layers = [EncoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)


class CausalFlowDecoder(nn.Module):
    """``qwen2_model.model``: the official wrapper around the Qwen2 body (kept for the checkpoint names)."""

    def __init__(self, args: Qwen2EncoderArgs):
        super().__init__()
        self.model = Qwen2Body(args)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        return self.model(x, mask)


class Qwen2Encoder(nn.Module):
    """``model.qwen2_model``: SAM features ``(B, g, g, C)`` -> query outputs ``(B, g * g, C)``."""

    def __init__(self, args: Qwen2EncoderArgs):
        super().__init__()
        self.model = CausalFlowDecoder(args)
        for size in QUERY_VIEWS:
            setattr(self, f"query_{size}", nn.Embedding((size // 64) ** 2, args.hidden_size))

    def queries(self, n: int) -> mx.array:
        """The learnt query table with ``n`` rows (the official code picks it by the token count)."""
        for size in QUERY_VIEWS:
            table = getattr(self, f"query_{size}").weight
            if table.shape[0] == n:
                return table
        raise ValueError(
            f"DeepSeek-OCR-2 has learnt queries for views of {' and '.join(map(str, QUERY_VIEWS))} pixels, "
            f"not for a view of {n} tokens"
        )

    def __call__(self, features: mx.array) -> mx.array:
        B, gh, gw, C = features.shape
        n = gh * gw
        queries = mx.broadcast_to(self.queries(n).astype(features.dtype)[None], (B, n, C))
        x = mx.concatenate([features.reshape(B, n, C), queries], axis=1)
        return self.model(x, causal_flow_mask(n, x.dtype))[:, n:]
