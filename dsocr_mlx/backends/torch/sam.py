"""SAM ViT-B/16 image encoder with DeepSeek-OCR's ``net_2``/``net_3`` downsampling, in PyTorch (NCHW)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import SamArgs
from ...interpolation import bicubic_antialias_matrix, linear_matrix, relative_position_index


def resize_grid_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bicubic resize of a ``(G, G, C)`` table to ``(size, size, C)``, in float32."""
    g = table.shape[0]
    if g == size:
        return table
    m = torch.from_numpy(bicubic_antialias_matrix(g, size)).to(table.device)  # (size, G)
    t = table.float()
    t = (m @ t.reshape(g, -1)).reshape(size, g, -1)  # rows
    return (m @ t).to(table.dtype)  # columns, broadcast over rows


def relative_positions(table: torch.Tensor, size: int) -> torch.Tensor:
    """``(size, size, C)`` relative-position embeddings, linearly resizing the table when needed."""
    length = 2 * size - 1
    if table.shape[0] != length:
        m = torch.from_numpy(linear_matrix(table.shape[0], length)).to(table.device)
        table = (m @ table.float()).to(table.dtype)
    return table[torch.from_numpy(relative_position_index(size)).to(table.device).long()]


class PatchEmbed(nn.Module):
    def __init__(self, args: SamArgs):
        super().__init__()
        self.proj = nn.Conv2d(3, args.width, kernel_size=args.patch_size, stride=args.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, H, W, C) from here on, like the reference


class Attention(nn.Module):
    """Multi-head attention with decomposed relative-position bias (computed from unscaled q)."""

    def __init__(self, args: SamArgs, size: int):
        super().__init__()
        self.num_heads = args.heads
        head_dim = args.width // args.heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(args.width, args.width * 3)
        self.proj = nn.Linear(args.width, args.width)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, H*W, hd)
        hd = q.shape[-1]
        rh = relative_positions(self.rel_pos_h, H)  # (H, H, hd)
        rw = relative_positions(self.rel_pos_w, W)  # (W, W, hd)
        r_q = q.reshape(B, self.num_heads, H, W, hd)
        rel_h = r_q @ rh.transpose(1, 2)  # (B, heads, H, W, H)
        rel_w = (r_q.transpose(2, 3) @ rw.transpose(1, 2)).transpose(2, 3)  # (B, heads, H, W, W)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, self.num_heads, H * W, H * W)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
        x = x.transpose(1, 2).reshape(B, H, W, -1)
        return self.proj(x)


class MLPBlock(nn.Module):
    def __init__(self, args: SamArgs):
        super().__init__()
        self.lin1 = nn.Linear(args.width, args.mlp_dim)
        self.lin2 = nn.Linear(args.mlp_dim, args.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split ``(B, H, W, C)`` into ``(B * n, window, window, C)`` windows, zero-padding the grid."""
    B, H, W, C = x.shape
    pad_h, pad_w = (-H) % window, (-W) % window
    if pad_h or pad_w:
        # The padded tokens are not masked: they act as keys/values through the qkv bias, as in SAM.
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.reshape(B, Hp // window, window, Wp // window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, C), (Hp, Wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    Hp, Wp = padded
    H, W = size
    B = windows.shape[0] // ((Hp // window) * (Wp // window))
    x = windows.reshape(B, Hp // window, Wp // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, Hp, Wp, -1)[:, :H, :W, :]


class Block(nn.Module):
    def __init__(self, args: SamArgs, window_size: int):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(args.width, eps=args.layer_norm_eps)
        self.attn = Attention(args, window_size if window_size else args.grid)
        self.norm2 = nn.LayerNorm(args.width, eps=args.layer_norm_eps)
        self.mlp = MLPBlock(args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
    """Channel LayerNorm of a conv feature map; channels are dimension 1 in PyTorch."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


class SamEncoder(nn.Module):
    """``model.sam_model``: pixels ``(B, 3, S, S)`` -> feature map ``(B, S/64, S/64, 1024)`` (channels last)."""

    def __init__(self, args: SamArgs):
        super().__init__()
        self.args = args
        self.patch_embed = PatchEmbed(args)
        self.pos_embed = nn.Parameter(torch.zeros(1, args.grid, args.grid, args.width))
        self.blocks = nn.ModuleList(
            [Block(args, 0 if i in args.global_attn_indexes else args.window_size) for i in range(args.layers)]
        )
        c = args.out_chans
        self.neck = nn.Sequential(
            nn.Conv2d(args.width, c, kernel_size=1, bias=False),
            LayerNorm2d(c, args.layer_norm_eps),
            nn.Conv2d(c, c, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(c, args.layer_norm_eps),
        )
        c2, c3 = args.downsample_channels
        self.net_2 = nn.Conv2d(c, c2, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(c2, c3, kernel_size=3, stride=2, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x + resize_grid_table(self.pos_embed[0], x.shape[1])
        for block in self.blocks:
            x = block(x)
        x = self.neck(x.permute(0, 3, 1, 2))
        return self.net_3(self.net_2(x)).permute(0, 2, 3, 1)
