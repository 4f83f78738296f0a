"""CLIP-L/14 vision tower fed with the SAM feature map as its patch embeddings, in MLX."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ...config import ClipArgs
from .sam import resize_grid_table


def quick_gelu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(1.702 * x)


def embedding_table(embedding: nn.Module) -> mx.array:
    """The full table of an embedding, dequantized if a conversion quantized it."""
    if isinstance(embedding, nn.QuantizedEmbedding):
        return mx.dequantize(
            embedding.weight,
            embedding.scales,
            embedding.get("biases"),
            embedding.group_size,
            embedding.bits,
            mode=embedding.mode,
        )
    return embedding.weight


class Embeddings(nn.Module):
    def __init__(self, args: ClipArgs):
        super().__init__()
        self.class_embedding = mx.zeros((args.width,))
        # Present in the checkpoint but unused: DeepSeek-OCR feeds SAM features instead of pixels.
        self.patch_embedding = nn.Conv2d(3, args.width, kernel_size=args.patch_size, stride=args.patch_size, bias=False)
        self.position_embedding = nn.Embedding(args.num_positions, args.width)

    def __call__(self, patch_embeds: mx.array) -> mx.array:
        B, H, W, C = patch_embeds.shape
        table = embedding_table(self.position_embedding)
        grid = int(round((table.shape[0] - 1) ** 0.5))
        positions = resize_grid_table(table[1:].reshape(grid, grid, C), H).reshape(H * W, C)
        positions = mx.concatenate([table[:1], positions], axis=0)
        cls = mx.broadcast_to(self.class_embedding.astype(patch_embeds.dtype), (B, 1, C))
        x = mx.concatenate([cls, patch_embeds.reshape(B, H * W, C)], axis=1)
        return x + positions


class Attention(nn.Module):
    def __init__(self, args: ClipArgs):
        super().__init__()
        self.num_heads = args.heads
        self.scale = (args.width // args.heads) ** -0.5
        self.qkv_proj = nn.Linear(args.width, args.width * 3)
        self.out_proj = nn.Linear(args.width, args.width)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).reshape(B, L, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        out = mx.fast.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ClipArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.width, args.intermediate_size)
        self.fc2 = nn.Linear(args.intermediate_size, args.width)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(quick_gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, args: ClipArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.layer_norm1 = nn.LayerNorm(args.width, eps=args.layer_norm_eps)
        self.mlp = MLP(args)
        self.layer_norm2 = nn.LayerNorm(args.width, eps=args.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Transformer(nn.Module):
    def __init__(self, args: ClipArgs):
        super().__init__()
        self.layers = [EncoderLayer(args) for _ in range(args.layers)]

    def __call__(self, x: mx.array) -> mx.array:
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

    def __call__(self, patch_embeds: mx.array) -> mx.array:
        return self.transformer(self.pre_layrnorm(self.embeddings(patch_embeds)))
