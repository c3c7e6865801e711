"""FLASH's semi-autoregressive head: from one drafter feature, the features of the next k positions.

Offset 0 is the decoder layer's own prediction; offsets 1..k-1 come from an MLP on it (residual,
so an untrained head starts by repeating the offset-0 feature). One drafter forward then yields a
block of k tokens. Our version sits after the full decoder layer rather than inside attention.
"""

from __future__ import annotations

import torch
from torch import nn


class SemiARHead(nn.Module):
    """[..., D] feature -> [..., k, D] features for offsets 0..k-1."""

    def __init__(self, hidden_size: int, k: int, mlp_hidden: int):
        super().__init__()
        assert k >= 2, "k = 1 needs no head"
        self.k = k
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden), nn.SiLU(), nn.Linear(mlp_hidden, (k - 1) * hidden_size)
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        further = self.mlp(feature).unflatten(-1, (self.k - 1, feature.shape[-1])) + feature.unsqueeze(-2)
        return torch.cat([feature.unsqueeze(-2), further], dim=-2)
