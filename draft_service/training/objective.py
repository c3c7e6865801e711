"""The drafter's training loss (EAGLE-1, as MSD and FLASH use it), over a batch of FeatureSamples.

loss = feature · SmoothL1(predicted h_{j+1+i}, h_{j+1+i}) + ce · soft-CE(lm_head(h), lm_head(predicted)),
on answer positions only, for every semi-AR offset i. Uniform noise on the input features makes
the drafter robust to its own imperfect predictions, which it consumes when drafting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from draft_service.feature.context import sequence_context
from draft_service.feature.model import FeatureDraftModel
from draft_service.training.features import FeatureSample
from speculum.model_facts import ModelFacts


@dataclass(frozen=True)
class LossWeights:
    """feature / ce: weights of the two terms · noise: width of the uniform noise on input features."""

    feature: float = 1.0
    ce: float = 0.1
    noise: float = 0.2

    def __post_init__(self) -> None:
        if min(self.feature, self.ce, self.noise) < 0:
            raise ValueError("loss weights and noise must be non-negative")


@dataclass(frozen=True)
class LossParts:
    """total (differentiable) and its parts as floats; top1: share of predicted features whose
    argmax token equals the target's (at offset 0 and overall)."""

    total: torch.Tensor
    feature: float
    ce: float
    top1: float


def feature_loss(model: FeatureDraftModel, facts: ModelFacts, samples: Sequence[FeatureSample],
                 weights: LossWeights, generator: torch.Generator | None = None) -> LossParts:
    """The loss over `samples`, run as one right-padded batch."""
    contexts, targets = [], []
    k = model.config.semi_ar_k
    for sample in samples:
        prompt = facts.expand_image_tokens(sample.prompt_ids)
        tokens = torch.tensor([*prompt, *sample.answer_ids])
        hidden = sample.hidden.float()  # [T, D]
        inputs = hidden[:-1]
        if weights.noise:
            inputs = inputs + (torch.rand(inputs.shape, generator=generator) - 0.5) * weights.noise
        visual = None if sample.visual_embeds is None else sample.visual_embeds.float()
        context = sequence_context(model, tokens, inputs, facts, len(prompt), visual)
        # Row with target position j, offset i predicts h_m, m = j + 1 + i; keep m whose next token
        # is an answer token (m + 1 >= prompt length) and exists (m + 1 <= T - 1).
        first = len(tokens) - len(sample.answer_ids) - 1
        m = context.target_positions[:, None] + 1 + torch.arange(k)[None, :]  # [T', k]
        valid = (context.target_positions[:, None] >= 0) & (m >= first) & (m <= len(tokens) - 2)
        contexts.append(context.inputs)
        targets.append((valid, hidden[m.clamp(max=len(tokens) - 1)]))  # [T', k], [T', k, D]
    width = max(len(c) for c in contexts)
    batch = torch.stack([F.pad(c, (0, 0, 0, width - len(c))) for c in contexts])  # [B, T', D]
    features = model(batch)  # [B, T', k, D]
    predicted = torch.cat([features[b, : len(contexts[b])][valid] for b, (valid, _) in enumerate(targets)])
    wanted = torch.cat([rows[valid] for valid, rows in targets])  # [M, D]
    feature_term = F.smooth_l1_loss(predicted, wanted)
    target_probs = model.logits(wanted).softmax(-1)
    draft_logp = model.logits(predicted).log_softmax(-1)
    ce_term = -(target_probs * draft_logp).sum(-1).mean()
    top1 = (draft_logp.argmax(-1) == target_probs.argmax(-1)).float().mean()
    total = weights.feature * feature_term + weights.ce * ce_term
    return LossParts(total, feature_term.item(), ce_term.item(), top1.item())
