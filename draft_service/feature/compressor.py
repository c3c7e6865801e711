"""FLASH's latent-aware visual compression: C learned queries attend over an image's N visual features.

F_hat = softmax(Q · F^T / sqrt(D)) · F, single head, no projections (as in the paper's formula):
the latents stay in the span of the visual features, so they live in the same space as the
drafter's other inputs. It runs once per image, in the vision-encoder service when its input is
the projected visual embeddings; `fingerprint` names its weights for the encoder's cache keys.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn


class LatentCompressor(nn.Module):
    """[I, N, D] visual features -> [I, C, D] latents."""

    def __init__(self, num_latents: int, hidden_size: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_latents, hidden_size) / math.sqrt(hidden_size))

    @property
    def num_latents(self) -> int:
        return self.queries.shape[0]

    @property
    def fingerprint(self) -> str:
        """Identity of these weights, for caching latents by content (changes when they are trained)."""
        digest = hashlib.sha256(self.queries.detach().float().cpu().numpy().tobytes()).hexdigest()
        return f"latent-compressor:{self.num_latents}x{self.queries.shape[1]}:{digest[:16]}"

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        assert features.dim() == 3 and features.shape[-1] == self.queries.shape[1], features.shape
        queries = self.queries.to(features.dtype)
        scores = torch.einsum("cd,ind->icn", queries, features) / math.sqrt(features.shape[-1])  # [I, C, N]
        return scores.softmax(dim=-1) @ features  # [I, C, D]
