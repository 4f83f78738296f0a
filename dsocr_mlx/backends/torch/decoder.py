"""DeepSeek-V2 decoder layers as DeepSeek-OCR configures them (MHA + RoPE, dense and MoE MLPs), in PyTorch."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...config import TextArgs


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, theta: float, offset: int | torch.Tensor) -> torch.Tensor:
    """Half-split rotary embedding at positions ``offset..offset+L-1``; angles in float32 as the reference.

    ``offset`` may be a ``(1,)`` device tensor, so that a captured decode step reads it at replay, or a
    ``(B,)`` one: each row of a batch at its own position.
    """
    L, dim = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    positions = torch.arange(L, device=x.device, dtype=torch.float32)
    if isinstance(offset, torch.Tensor):
        t = offset.to(torch.float32).reshape(-1, 1, 1) + positions[:, None]  # (B or 1, L, 1)
        freqs = (t * inv_freq)[:, None]  # (B or 1, 1, L, dim / 2): one table per row, shared by the heads
    else:
        freqs = torch.outer(offset + positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dims))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


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
        self.q_proj = Linear(args.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, args.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, mask: Any = None, cache: Any = None) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(x).reshape(B, L, self.num_kv_heads, -1).transpose(1, 2)
        v = self.v_proj(x).reshape(B, L, self.num_kv_heads, -1).transpose(1, 2)
        offset = cache.offset if cache is not None else 0
        q = rope(q, self.rope_theta, offset)
        k = rope(k, self.rope_theta, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        causal = False
        gqa = self.num_heads != self.num_kv_heads
        if isinstance(mask, str) and k.shape[2] == L:  # "causal" over the whole sequence
            mask = None
            causal = True
        elif isinstance(mask, str):  # a chunk after cached positions: row i sees keys up to offset + i
            mask = torch.ones(L, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - L)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=gqa
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class Linear(nn.Linear):
    """``nn.Linear`` that puts the weight on the left of the product on a CPU for more than one row.

    MKL reads a weight 1.5 to 3x faster as ``W @ x.T`` than as ``x @ W.T`` for the few rows of a decode batch
    (2 to 4 rows; no slower for hundreds), and decoding is bound by reading weights. One row (batch-1 decode)
    and GPUs take the usual path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows < 2 or x.device.type != "cpu":
            return super().forward(x)
        y = (self.weight @ x.reshape(rows, x.shape[-1]).T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SwitchLinear(nn.Module):
    """One linear layer per expert, stacked as ``(experts, out, in)``."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, output_dims, input_dims))

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``x (N, in)`` through expert ``indices[n]`` each: reads only the selected experts' weights."""
        return torch.bmm(self.weight.index_select(0, indices), x[:, :, None])[:, :, 0]


class SwitchGLU(nn.Module):
    """The routed experts: SwiGLU per expert, each token through its top-k experts."""

    # On an accelerator, below this many (token, expert) pairs, gather the selected weights: one kernel and
    # no host sync. On CPU the grouped path reads each expert's weights in place, which is faster at any size.
    gather_limit = 32

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(hidden_size, intermediate_size, num_experts)
        self.up_proj = SwitchLinear(hidden_size, intermediate_size, num_experts)
        self.down_proj = SwitchLinear(intermediate_size, hidden_size, num_experts)

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``x (..., D)``, ``indices (..., k)`` -> ``(..., k, D)``."""
        lead, k, D = indices.shape[:-1], indices.shape[-1], x.shape[-1]
        flat = indices.reshape(-1)
        rows = x.reshape(-1, 1, D).expand(-1, k, D).reshape(-1, D)  # one row per (token, expert) pair
        if self.use_gather(flat.numel(), x.device):
            return self.gathered(rows, flat).reshape(*lead, k, D)
        return self.grouped(rows, flat).reshape(*lead, k, D)

    def use_gather(self, pairs: int, device: torch.device) -> bool:
        return pairs <= self.gather_limit and device.type != "cpu"

    def gathered(self, rows: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Row ``n`` through expert ``flat[n]``, with the selected experts' weights gathered."""
        h = F.silu(self.gate_proj(rows, flat)) * self.up_proj(rows, flat)
        return self.down_proj(h, flat)

    def grouped(self, rows: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """The same, one matmul per expert over its rows (reads the routing on the host)."""
        out = torch.empty_like(rows)
        order = torch.argsort(flat)
        counts = torch.bincount(flat, minlength=self.gate_proj.weight.shape[0]).tolist()
        start = 0
        for expert, count in enumerate(counts):
            if count:
                sel = order[start : start + count]
                # Weight on the left: MKL reads a weight 2-3x faster this way for 2 to 4 rows (no slower for 1
                # or for hundreds), which is what a decode batch gives each expert.
                r = rows[sel].T
                h = F.silu(self.gate_proj.weight[expert] @ r) * (self.up_proj.weight[expert] @ r)
                out[sel] = (self.down_proj.weight[expert] @ h).T
                start += count
        return out


class MoEGate(nn.Module):
    """Softmax router with greedy top-k; weights are the raw probabilities unless ``norm_topk_prob``."""

    def __init__(self, args: TextArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.routed_scaling_factor = args.routed_scaling_factor
        self.weight = nn.Parameter(torch.zeros(args.n_routed_experts, args.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = x.float() @ self.weight.float().T
        scores = logits.softmax(dim=-1)
        weights, indices = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return indices, weights * self.routed_scaling_factor


class MoE(nn.Module):
    """Routed experts plus the always-on shared experts."""

    def __init__(self, args: TextArgs):
        super().__init__()
        self.gate = MoEGate(args)
        self.experts = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.n_routed_experts)
        self.shared_experts = (
            MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts) if args.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices, weights = self.gate(x)
        y = self.experts(x, indices)  # (B, L, k, D)
        # The reference weights the expert outputs in float32, then casts back.
        y = (y.float() * weights[..., None]).sum(dim=-2).to(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, args: TextArgs, index: int):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MoE(args) if args.is_moe_layer(index) else MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def forward(self, x: torch.Tensor, mask: Any = None, cache: Any = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))
