"""SAM ViT-B/16 image encoder with DeepSeek-OCR's ``net_2``/``net_3`` downsampling, in MLX (NHWC)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ...config import SamArgs
from ...interpolation import bicubic_antialias_matrix, linear_matrix, relative_position_index


def resize_grid_table(table: mx.array, size: int) -> mx.array:
    """Antialiased bicubic resize of a ``(G, G, C)`` table to ``(size, size, C)``, in float32."""
    g = table.shape[0]
    if g == size:
        return table
    m = mx.array(bicubic_antialias_matrix(g, size))  # (size, G)
    t = table.astype(mx.float32)
    t = (m @ t.reshape(g, -1)).reshape(size, g, -1)  # rows
    return (m @ t).astype(table.dtype)  # columns, broadcast over rows


def relative_positions(table: mx.array, size: int) -> mx.array:
    """``(size, size, C)`` relative-position embeddings, linearly resizing the table when needed."""
    length = 2 * size - 1
    if table.shape[0] != length:
        m = mx.array(linear_matrix(table.shape[0], length))
        table = (m @ table.astype(mx.float32)).astype(table.dtype)
    return table[mx.array(relative_position_index(size))]


class PatchEmbed(nn.Module):
    def __init__(self, args: SamArgs):
        super().__init__()
        self.proj = nn.Conv2d(3, args.width, kernel_size=args.patch_size, stride=args.patch_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head attention with decomposed relative-position bias (computed from unscaled q)."""

    band_bytes = 1 << 28  # the float32 bias and scores of one band of query rows stay under this

    def __init__(self, args: SamArgs, size: int):
        super().__init__()
        self.num_heads = args.heads
        head_dim = args.width // args.heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(args.width, args.width * 3)
        self.proj = nn.Linear(args.width, args.width)
        self.rel_pos_h = mx.zeros((2 * size - 1, head_dim))
        self.rel_pos_w = mx.zeros((2 * size - 1, head_dim))

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, H*W, hd)
        hd = q.shape[-1]
        rh = relative_positions(self.rel_pos_h, H)  # (H, H, hd)
        rw = relative_positions(self.rel_pos_w, W)  # (W, W, hd)
        r_q = q.reshape(B, self.num_heads, H, W, hd)
        rel_h = r_q @ rh.swapaxes(1, 2)  # (B, heads, H, W, H)
        rel_w = (r_q.swapaxes(2, 3) @ rw.swapaxes(1, 2)).swapaxes(2, 3)  # (B, heads, H, W, W)
        # The bias is heads x (HW)^2, as in the reference: 805 MB in float32 at 1024 px. Attending one band of
        # query rows at a time (evaluated before the next) keeps only that band's bias and scores alive, with
        # the same arithmetic.
        rows = max(1, min(H, self.band_bytes // (B * self.num_heads * W * H * W * 4)))
        bands = []
        for r0 in range(0, H, rows):
            r1 = min(H, r0 + rows)
            bias = rel_h[:, :, r0:r1, :, :, None] + rel_w[:, :, r0:r1, :, None, :]
            bias = bias.reshape(B, self.num_heads, (r1 - r0) * W, H * W).astype(q.dtype)
            bands.append(
                mx.fast.scaled_dot_product_attention(q[:, :, r0 * W : r1 * W], k, v, scale=self.scale, mask=bias)
            )
            if r1 < H:
                mx.eval(bands[-1])  # the lazy graph would otherwise build every band's bias before any is freed
        x = mx.concatenate(bands, axis=2) if len(bands) > 1 else bands[0]
        x = x.transpose(0, 2, 1, 3).reshape(B, H, W, -1)
        return self.proj(x)


class MLPBlock(nn.Module):
    def __init__(self, args: SamArgs):
        super().__init__()
        self.lin1 = nn.Linear(args.width, args.mlp_dim)
        self.lin2 = nn.Linear(args.mlp_dim, args.width)

    def __call__(self, x: mx.array) -> mx.array:
        return self.lin2(nn.gelu(self.lin1(x)))


def window_partition(x: mx.array, window: int) -> tuple[mx.array, tuple[int, int]]:
    """Split ``(B, H, W, C)`` into ``(B * n, window, window, C)`` windows, zero-padding the grid."""
    B, H, W, C = x.shape
    pad_h, pad_w = (-H) % window, (-W) % window
    if pad_h or pad_w:
        # The padded tokens are not masked: they act as keys/values through the qkv bias, as in SAM.
        x = mx.pad(x, [(0, 0), (0, pad_h), (0, pad_w), (0, 0)])
    Hp, Wp = H + pad_h, W + pad_w
    x = x.reshape(B, Hp // window, window, Wp // window, window, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, C), (Hp, Wp)


def window_unpartition(windows: mx.array, window: int, padded: tuple[int, int], size: tuple[int, int]) -> mx.array:
    Hp, Wp = padded
    H, W = size
    B = windows.shape[0] // ((Hp // window) * (Wp // window))
    x = windows.reshape(B, Hp // window, Wp // window, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, Hp, Wp, -1)[:, :H, :W, :]


class Block(nn.Module):
    def __init__(self, args: SamArgs, window_size: int):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(args.width, eps=args.layer_norm_eps)
        self.attn = Attention(args, window_size if window_size else args.grid)
        self.norm2 = nn.LayerNorm(args.width, eps=args.layer_norm_eps)
        self.mlp = MLPBlock(args)

    def __call__(self, x: mx.array) -> mx.array:
        shortcut = x
        x = self.norm1(x)
        if self.window_size:
            H, W = x.shape[1:3]
            x, padded = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, padded, (H, W))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class LayerNorm2d(nn.Module):
    """Channel LayerNorm of a conv feature map; channels are last in MLX."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.layer_norm(x, self.weight, self.bias, self.eps)


class SamEncoder(nn.Module):
    """``model.sam_model``: pixels ``(B, S, S, 3)`` -> feature map ``(B, S/64, S/64, 1024)``."""

    def __init__(self, args: SamArgs):
        super().__init__()
        self.args = args
        self.patch_embed = PatchEmbed(args)
        self.pos_embed = mx.zeros((1, args.grid, args.grid, args.width))
        self.blocks = [
            Block(args, 0 if i in args.global_attn_indexes else args.window_size) for i in range(args.layers)
        ]
        c = args.out_chans
        self.neck = [
            nn.Conv2d(args.width, c, kernel_size=1, bias=False),
            LayerNorm2d(c, args.layer_norm_eps),
            nn.Conv2d(c, c, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(c, args.layer_norm_eps),
        ]
        c2, c3 = args.downsample_channels
        self.net_2 = nn.Conv2d(c, c2, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(c2, c3, kernel_size=3, stride=2, padding=1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.patch_embed(x)
        x = x + resize_grid_table(self.pos_embed[0], x.shape[1])
        for block in self.blocks:
            x = block(x)
        for layer in self.neck:
            x = layer(x)
        return self.net_3(self.net_2(x))
