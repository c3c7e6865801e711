"""The drafter's training loss (EAGLE-1, as MSD and FLASH use it), over a batch of FeatureSamples.

loss = feature · SmoothL1(predicted h_{j+1+i}, h_{j+1+i}) + ce · soft-CE(lm_head(h), lm_head(predicted)),
on answer positions only, for every semi-AR offset i. Uniform noise on the input features makes
the drafter robust to its own imperfect predictions, which it consumes when drafting.

With `lookahead` > 0, a second term trains the rows a pipelined look-ahead feeds
(draft_service.feature.branches): after a real row p, the rows of the k tokens being verified are
fused with the drafter's own predictions out[p, 0..k-1] instead of the target's features, and what
they predict is what the look-ahead drafts. A second forward runs each sequence's real rows again
with such blocks appended, one after every (k + 1)-th answer row, at the positions they stand for; a
tree mask lets a block's rows see the real rows up to p and their own block only, exactly the
context they have when serving (one layer: a row's keys and values depend on its own input alone).
The predictions feeding the blocks are detached.
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
    lookahead: float = 0.0  # weight of the look-ahead term (module docstring); 0 skips its forward

    def __post_init__(self) -> None:
        if min(self.feature, self.ce, self.noise, self.lookahead) < 0:
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
    contexts, targets, tokens_of, firsts = [], [], [], []
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
        contexts.append(context)
        targets.append((valid, hidden[m.clamp(max=len(tokens) - 1)]))  # [T', k], [T', k, D]
        tokens_of.append(tokens)
        firsts.append(first)
    width = max(len(c.inputs) for c in contexts)
    batch = torch.stack([F.pad(c.inputs, (0, 0, 0, width - len(c.inputs))) for c in contexts])  # [B, T', D]
    features = model(batch)  # [B, T', k, D]
    total, parts = _terms(model, [features[b, : len(c.inputs)] for b, c in enumerate(contexts)],
                          [valid for valid, _ in targets], [rows for _, rows in targets], weights)
    if weights.lookahead:
        blocks = [_lookahead_blocks(model, c, t, f, features[b].detach(), k, generator)
                  for b, (c, t, f) in enumerate(zip(contexts, tokens_of, firsts))]
        width = max(len(rows) for rows, _, _, _ in blocks)
        batch = torch.stack([F.pad(rows, (0, 0, 0, width - len(rows))) for rows, _, _, _ in blocks])
        positions = torch.stack([F.pad(where, (0, width - len(where))) for _, where, _, _ in blocks])
        masks = torch.stack([_padded(visible, width) for _, _, visible, _ in blocks])
        ahead = model(batch, attention_mask=masks[:, None], positions=positions)  # [B, T' + S, k, D]
        # a block row at position r predicts what the real row at r would: same offsets, same targets
        real = [len(c.inputs) for c in contexts]
        spec_out = [ahead[b, real[b] : real[b] + len(spec)] for b, (_, _, _, spec) in enumerate(blocks)]
        spec_valid = [valid[spec] for (valid, _), (_, _, _, spec) in zip(targets, blocks)]
        if any(v.any() for v in spec_valid):
            spec_wanted = [wanted[spec] for (_, wanted), (_, _, _, spec) in zip(targets, blocks)]
            term, _ = _terms(model, spec_out, spec_valid, spec_wanted, weights)
            total = total + weights.lookahead * term
    return LossParts(total, *parts)


def _terms(model: FeatureDraftModel, features: Sequence[torch.Tensor], valid: Sequence[torch.Tensor],
           wanted_rows: Sequence[torch.Tensor], weights: LossWeights) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """The weighted loss of each sample's `features` [R_b, k, D] at its `valid` [R_b, k] rows and
    offsets, against `wanted_rows` [R_b, k, D]; and (feature, ce, top1) as floats."""
    predicted = torch.cat([f[v] for f, v in zip(features, valid)])
    wanted = torch.cat([rows[v] for v, rows in zip(valid, wanted_rows)])  # [M, D]
    feature_term = F.smooth_l1_loss(predicted, wanted)
    target_probs = model.logits(wanted).softmax(-1)
    draft_logp = model.logits(predicted).log_softmax(-1)
    ce_term = -(target_probs * draft_logp).sum(-1).mean()
    top1 = (draft_logp.argmax(-1) == target_probs.argmax(-1)).float().mean()
    total = weights.feature * feature_term + weights.ce * ce_term
    return total, (feature_term.item(), ce_term.item(), top1.item())


def _padded(visible: torch.Tensor, width: int) -> torch.Tensor:
    """visible [T, T] -> [width, width]: padding rows see only themselves (SDPA needs a visible key)."""
    out = torch.eye(width, dtype=torch.bool)
    out[: len(visible), : len(visible)] = visible
    return out


def _lookahead_blocks(model: FeatureDraftModel, context, tokens: torch.Tensor, first: int, features: torch.Tensor,
                      k: int, generator: torch.Generator | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sequence's rows for the look-ahead term: (rows [T' + S, D], positions [T' + S],
    visible [T' + S, T' + S] bool, spec [S]: the row each appended one stands for).

    The T' real rows come first, causal. Then blocks of k answer rows, each after one real row p
    (every (k + 1)-th answer row, from a random phase): the row standing for p + 1 + d is fused with
    out[p, d], the drafter's prediction of h_{p+1+d}, and sees rows 0..p and its block up to itself."""
    real = len(context.inputs)
    answer_rows = torch.nonzero(context.target_positions >= first).flatten()  # text rows, consecutive
    phase = int(torch.randint(k + 1, (1,), generator=generator))
    sources, offsets = [], []  # block row p + 1 + d: its real row p and its offset d
    for start in range(phase, len(answer_rows) - 1, k + 1):
        p = int(answer_rows[start])
        for d in range(min(k, len(answer_rows) - 1 - start)):
            sources.append(p)
            offsets.append(d)
    source, offset = torch.tensor(sources, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)
    spec_rows = source + 1 + offset
    visible = torch.ones(real + len(spec_rows), real + len(spec_rows), dtype=torch.bool).tril_()
    if not sources:
        return context.inputs, torch.arange(real), visible, spec_rows
    next_tokens = tokens[context.target_positions[spec_rows] + 1]
    fed = model.fuse(model.embed(next_tokens), features[source, offset])
    visible[real:, :real] = torch.arange(real)[None, :] <= source[:, None]  # the real rows up to p
    same_block = (source[:, None] == source[None, :]) & (offset[None, :] <= offset[:, None])
    visible[real:, real:] = same_block
    return torch.cat([context.inputs, fed]), torch.cat([torch.arange(real), spec_rows]), visible, spec_rows
