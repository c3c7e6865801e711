"""The feature draft model: fc over (next-token embedding, target feature) -> one Llama decoder layer
(feature/layer.py) -> predicted target feature(s) -> the target's frozen LM head.

EAGLE's layout: the decoder layer has no input norm (its inputs are fc outputs, already scaled as
target features) and there is no final norm (the predicted feature is the target's post-norm state).
Only fc, the layer, the compressor and the semi-AR head are trained; the target's embedding and
head are non-persistent buffers, so checkpoints never contain them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from draft_service.feature.compressor import LatentCompressor
from draft_service.feature.config import FeatureDrafterConfig
from draft_service.feature.layer import DecoderLayer, LayerCache
from draft_service.feature.semi_ar import SemiARHead
from draft_service.feature.target_parts import TargetParts


class FeatureDraftModel(nn.Module):
    """The trainable drafter plus the two frozen target tensors it uses."""

    def __init__(self, config: FeatureDrafterConfig, parts: TargetParts):
        super().__init__()
        assert parts.embedding.shape == (config.vocab_size, config.hidden_size), parts.embedding.shape
        self.config = config
        self.register_buffer("embedding", parts.embedding, persistent=False)  # [V, D] frozen
        self.register_buffer("lm_head", parts.lm_head, persistent=False)  # [V, D] frozen
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=True)
        self.layer = DecoderLayer(config)
        self.compressor = LatentCompressor(config.num_latents, config.hidden_size) if config.compress_visual else None
        self.semi_ar = SemiARHead(config.hidden_size, config.semi_ar_k, config.semi_ar_hidden) if config.semi_ar_k > 1 else None

    def new_cache(self) -> LayerCache:
        return LayerCache()

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[...] ids -> [..., D] the target's input embeddings."""
        return F.embedding(token_ids, self.embedding)

    def fuse(self, next_embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """fc(e_{j+1}, h_j): [..., D] and [..., D] -> [..., D] (embedding first, as EAGLE orders it)."""
        return self.fc(torch.cat([next_embeds, hidden.to(next_embeds.dtype)], dim=-1))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """[..., D] predicted features -> [..., V] through the target's LM head."""
        return F.linear(features, self.lm_head)

    def forward(
        self,
        inputs: torch.Tensor,
        cache: LayerCache | None = None,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        last_only: bool = False,
        only: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """inputs: [B, T, D] rows after the cache's -> features [B, T, k, D] for offsets 0..k-1
        ([B, k, D] of the last row alone with `last_only`: what drafting after a block needs;
        [B, R, k, D] of the tree rows `only` alone, R indices: every row still joins the cache).

        With a cache the rows are appended to it (B = 1); without one, a whole right-padded batch runs
        causally (padding rows come after the real ones, so real rows never see them). A candidate
        tree gives its own `attention_mask` [1, 1, T, S + T] (bool) and `positions` [1, T].
        """
        assert inputs.dim() == 3 and inputs.shape[-1] == self.config.hidden_size, inputs.shape
        out = self.layer(inputs, cache, attention_mask, positions, last_only, only)
        if last_only:
            out = out[:, 0]
        return out.unsqueeze(-2) if self.semi_ar is None else self.semi_ar(out)

    def forward_many(self, inputs: list[torch.Tensor], caches: list[LayerCache]) -> torch.Tensor:
        """Sessions' new rows inputs[i] [T_i, D] after caches[i] (appended) -> [B, k, D], the features
        after each one's last row: `forward(inputs[i][None], caches[i], last_only=True)` for all at once."""
        out = self.layer.forward_last_many(inputs, caches)
        return out.unsqueeze(-2) if self.semi_ar is None else self.semi_ar(out)
