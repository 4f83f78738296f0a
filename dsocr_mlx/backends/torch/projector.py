"""Linear projector from the concatenated CLIP and SAM features to the decoder width, in PyTorch."""

from __future__ import annotations

import torch
from torch import nn

from ...config import ProjectorArgs


class Projector(nn.Module):
    """``model.projector``: ``(..., 2048)`` -> ``(..., 1280)``."""

    def __init__(self, args: ProjectorArgs):
        super().__init__()
        self.layers = nn.Linear(args.input_dim, args.n_embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
