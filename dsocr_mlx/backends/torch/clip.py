"""CLIP-L/14 vision tower fed with the SAM feature map as its patch embeddings, in PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ClipArgs
from .sam import resize_grid_table


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class Embeddings(nn.Module):
    def __init__(self, args: ClipArgs):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(args.width))
        # Present in the checkpoint but unused: DeepSeek-OCR feeds SAM features instead of pixels.
        self.patch_embedding = nn.Conv2d(3, args.width, kernel_size=args.patch_size, stride=args.patch_size, bias=False)
        self.position_embedding = nn.Embedding(args.num_positions, args.width)

    def forward(self, patch_embeds: torch.Tensor) -> torch.Tensor:
        B, H, W, C = patch_embeds.shape
        table = self.position_embedding.weight
        grid = int(round((table.shape[0] - 1) ** 0.5))
        positions = resize_grid_table(table[1:].reshape(grid, grid, C), H).reshape(H * W, C)
        positions = torch.cat([table[:1], positions], dim=0)
        cls = self.class_embedding.to(patch_embeds.dtype).expand(B, 1, C)
        x = torch.cat([cls, patch_embeds.reshape(B, H * W, C)], dim=1)
        return x + positions


class Attention(nn.Module):
    def __init__(self, args: ClipArgs):
        super().__init__()
        self.num_heads = args.heads
        self.scale = (args.width // args.heads) ** -0.5
        self.qkv_proj = nn.Linear(args.width, args.width * 3)
        self.out_proj = nn.Linear(args.width, args.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).reshape(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ClipArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.width, args.intermediate_size)
        self.fc2 = nn.Linear(args.intermediate_size, args.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, args: ClipArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.layer_norm1 = nn.LayerNorm(args.width, eps=args.layer_norm_eps)
        self.mlp = MLP(args)
        self.layer_norm2 = nn.LayerNorm(args.width, eps=args.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Transformer(nn.Module):
    def __init__(self, args: ClipArgs):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(args) for _ in range(args.layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ClipVisionTower(nn.Module):
    """``model.vision_model``: SAM map ``(B, g, g, C)`` -> ``(B, 1 + g*g, C)`` (class token first, no post-norm)."""

    def __init__(self, args: ClipArgs):
        super().__init__()
        self.embeddings = Embeddings(args)
        self.pre_layrnorm = nn.LayerNorm(args.width, eps=args.layer_norm_eps)  # (sic) checkpoint name
        self.transformer = Transformer(args)

    def forward(self, patch_embeds: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.pre_layrnorm(self.embeddings(patch_embeds)))
