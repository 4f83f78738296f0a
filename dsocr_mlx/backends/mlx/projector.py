"""Linear projector from the concatenated CLIP and SAM features to the decoder width, in MLX."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ...config import ProjectorArgs


class Projector(nn.Module):
    """``model.projector``: ``(..., 2048)`` -> ``(..., 1280)``."""

    def __init__(self, args: ProjectorArgs):
        super().__init__()
        self.layers = nn.Linear(args.input_dim, args.n_embed)

    def __call__(self, x: mx.array) -> mx.array:
        return self.layers(x)
