"""DeepSeek-V2 decoder layers as DeepSeek-OCR configures them (MHA + RoPE, dense and MoE MLPs), in MLX."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...config import TextArgs


class Attention(nn.Module):
    """Standard multi-head attention with half-split (``rotate_half``) RoPE; no biases."""

    def __init__(self, args: TextArgs):
        super().__init__()
        self.num_heads = args.num_attention_heads
        self.num_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        self.rope_theta = args.rope_theta
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, args.hidden_size, bias=bias)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=offset)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class SwitchLinear(nn.Module):
    """One linear layer per expert, stacked as ``(experts, out, in)`` and applied with a gathered matmul."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, output_dims, input_dims))

    @property
    def compute_dtype(self) -> mx.Dtype:
        return self.weight.dtype

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

    def to_quantized(
        self, group_size: int | None = None, bits: int | None = None, mode: str = "affine", **_
    ) -> nn.Module:
        from .quantize import QuantizedSwitchLinear

        return QuantizedSwitchLinear(self.weight, group_size or 64, bits or 4, mode)


class SwitchGLU(nn.Module):
    """The routed experts: SwiGLU per expert, each token through its top-k experts, no Python loop."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(hidden_size, intermediate_size, num_experts)
        self.up_proj = SwitchLinear(hidden_size, intermediate_size, num_experts)
        self.down_proj = SwitchLinear(intermediate_size, hidden_size, num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """``x (..., D)``, ``indices (..., k)`` -> ``(..., k, D)``."""
        k = indices.shape[-1]
        lead = indices.shape[:-1]
        flat = indices.flatten()
        # More than one token (a prefill, or a batch of rows decoding together): sort the (token, expert)
        # pairs by expert so each expert's weights are read once, however many tokens chose it.
        do_sort = flat.size > k
        if do_sort and mx.default_device() == mx.cpu and isinstance(self.gate_proj, SwitchLinear):
            return self.grouped(x, indices)
        x = mx.expand_dims(x, (-2, -3))  # (..., 1, 1, D): one row per (token, expert) pair after gathering
        if do_sort:
            order = mx.argsort(flat)
            x = x.reshape(-1, 1, x.shape[-1])[order // k]
            idx = flat[order]
        else:
            idx = indices
        h = nn.silu(self.gate_proj(x, idx, do_sort)) * self.up_proj(x, idx, do_sort)
        y = self.down_proj(h, idx, do_sort)
        if do_sort:
            y = y[mx.argsort(order)]
        return y.reshape(*lead, k, -1)

    def grouped(self, x: mx.array, indices: mx.array) -> mx.array:
        """The same, each chosen expert's weights read once for all its tokens. Reads the routing on the host.

        The tokens are laid out as one zero-padded block of rows per chosen expert, ``(experts, rows, D)``, and
        each block goes through its expert in one ``gather_mm`` call. MLX's CPU kernels make this the fast
        way there (full-size layer, 2 cores): against its ``gather_mm`` over sorted pairs it is 10x faster for
        2 tokens and 35x for 16; against one matmul per expert on a weight slice (the slice is copied first)
        5x for 2 tokens, 3.7x for 16, 1.9x for a 278-token prefill and 1.1x for 1121. The padding rows are
        wasted arithmetic, never read back.
        """
        k, D = indices.shape[-1], x.shape[-1]
        flat = np.array(indices.flatten())
        order = np.argsort(flat, kind="stable")
        experts, counts = np.unique(flat, return_counts=True)
        rows = int(counts.max())
        # Pair order[j] (sorted by expert) goes to row ``slot`` of its expert's block.
        slot = np.arange(flat.size) - np.repeat(np.cumsum(counts) - counts, counts)
        dest = np.repeat(np.arange(experts.size), counts) * rows + slot
        source = np.zeros(experts.size * rows, dtype=np.int64)  # padding rows repeat token 0
        source[dest] = order // k
        blocks = x.reshape(-1, D)[mx.array(source)].reshape(experts.size, rows, D)
        ids = mx.array(experts.astype(np.uint32))
        g, u, d = (p.weight.swapaxes(-1, -2) for p in (self.gate_proj, self.up_proj, self.down_proj))
        h = nn.silu(mx.gather_mm(blocks, g, rhs_indices=ids)) * mx.gather_mm(blocks, u, rhs_indices=ids)
        out = mx.gather_mm(h, d, rhs_indices=ids).reshape(-1, D)
        position = np.empty_like(dest)
        position[order] = dest  # where pair j (in the caller's order) landed
        return out[mx.array(position)].reshape(*indices.shape, D)


class MoEGate(nn.Module):
    """Softmax router with greedy top-k; weights are the raw probabilities unless ``norm_topk_prob``."""

    def __init__(self, args: TextArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.routed_scaling_factor = args.routed_scaling_factor
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T
        scores = mx.softmax(logits, axis=-1, precise=True)
        k = self.top_k
        indices = mx.stop_gradient(mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k])
        weights = mx.take_along_axis(scores, indices, axis=-1)
        if self.norm_topk_prob and k > 1:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        return indices, weights * self.routed_scaling_factor


class MoE(nn.Module):
    """Routed experts, stacked and dispatched with gathered matmuls, plus the always-on shared experts."""

    def __init__(self, args: TextArgs):
        super().__init__()
        self.gate = MoEGate(args)
        self.experts = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.n_routed_experts)
        self.shared_experts = (
            MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts) if args.n_shared_experts else None
        )

    def __call__(self, x: mx.array) -> mx.array:
        indices, weights = self.gate(x)
        # Experts may be held in float32 where gathered half-precision matmuls are unsupported (MLX CPU).
        dtype = self.experts.gate_proj.compute_dtype
        y = self.experts(x if dtype is None else x.astype(dtype), indices)  # (B, L, k, D)
        # The reference weights the expert outputs in float32, then casts back.
        y = (y * weights[..., None]).sum(axis=-2).astype(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, args: TextArgs, index: int):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MoE(args) if args.is_moe_layer(index) else MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))
