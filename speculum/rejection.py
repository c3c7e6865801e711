"""Deciding how much of a draft block the target accepts: greedy matching and speculative sampling.

Speculative sampling follows Leviathan et al. (arXiv 2211.17192) / Chen et al. (arXiv 2302.01318):
accept draft token x with probability min(1, target_probs[x] / draft_probs[x]); at the first
rejection emit a *recovered* token from norm(max(0, target_probs - draft_probs)); when every draft
is accepted emit a *bonus* token from the target's next distribution. Drafters that send no
probabilities (n-gram) are one-hot drafts: draft_probs[x] = 1. Candidate trees are checked branch by branch (greedy, and
recursive rejection sampling). Pure tensor math, no model here.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from speculum import tree
from speculum.sampling import sample


class NextTokenKind(enum.Enum):
    """Where the token after the accepted prefix came from."""

    BONUS = "bonus"  # the target's own next token (greedy always; sampling when all drafts pass)
    RECOVERED = "recovered"  # sampled from the residual distribution at the first rejection


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one draft block: the first `num_accepted` drafts, then `next_token`."""

    num_accepted: int
    next_token: int
    next_kind: NextTokenKind


def verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """Longest prefix equal to the target's argmax, then the target's argmax after it.

    draft_tokens: [K] · target_logits: [K + 1, V] (row i scores the token at draft position i).
    """
    num_drafts = draft_tokens.shape[0]
    assert target_logits.shape[0] == num_drafts + 1, (target_logits.shape, num_drafts)
    target_tokens = target_logits.argmax(dim=-1)  # [K + 1]
    mismatches = (draft_tokens != target_tokens[:num_drafts]).nonzero()
    num_accepted = int(mismatches[0]) if len(mismatches) else num_drafts
    return Verdict(num_accepted, int(target_tokens[num_accepted]), NextTokenKind.BONUS)


def verify_sampling(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator,
) -> Verdict:
    """Speculative sampling over a chain.

    draft_tokens: [K] · draft_probs: [K, V] or None (one-hot drafts) · target_probs: [K + 1, V].
    Both distributions must already carry the same temperature / top-k / top-p transforms.
    """
    num_drafts = draft_tokens.shape[0]
    assert target_probs.shape[0] == num_drafts + 1, (target_probs.shape, num_drafts)
    positions = torch.arange(num_drafts)
    target_at_draft = target_probs[positions, draft_tokens]  # [K]
    if draft_probs is None:
        draft_at_draft = torch.ones(num_drafts)
    else:
        assert draft_probs.shape == target_probs[:num_drafts].shape, (draft_probs.shape, target_probs.shape)
        draft_at_draft = draft_probs[positions, draft_tokens]
    uniforms = torch.rand(num_drafts, generator=generator)
    # u < p/q without dividing: accepts with probability min(1, p/q), and never when p == 0.
    rejected = (uniforms * draft_at_draft >= target_at_draft).nonzero()
    if not len(rejected):
        return Verdict(num_drafts, sample(target_probs[num_drafts], generator), NextTokenKind.BONUS)
    first = int(rejected[0])
    residual = _residual(target_probs[first], draft_probs[first] if draft_probs is not None else None, draft_tokens[first])
    return Verdict(first, sample(residual, generator), NextTokenKind.RECOVERED)


def _residual(target_probs: torch.Tensor, draft_probs: torch.Tensor | None, draft_token: torch.Tensor) -> torch.Tensor:
    """norm(max(0, target_probs - draft_probs)) over [V]; a one-hot draft removes only its token."""
    if draft_probs is None:
        residual = target_probs.clone()
        residual[draft_token] = 0.0
    else:
        residual = (target_probs - draft_probs).clamp_min(0.0)
    total = residual.sum()
    if total <= 0:  # only reachable through rounding when the two distributions coincide
        return target_probs
    return residual / total


@dataclass(frozen=True)
class TreeVerdict:
    """The outcome of checking a candidate tree: the accepted branch, then `next_token`.

    path: accepted node indices from the pending token's child downwards (a branch of the tree).
    """

    path: tuple[int, ...]
    next_token: int
    next_kind: NextTokenKind


def verify_tree_greedy(draft_tokens: Sequence[int], parents: Sequence[int], target_logits: torch.Tensor) -> TreeVerdict:
    """Walk down the tree while some child is the target's argmax; then the argmax after it.

    draft_tokens: [N] · parents: [N] (see speculum.tree) · target_logits: [N + 1, V], row 0 the
    pending token's, row i + 1 node i's.
    """
    assert target_logits.shape[0] == len(draft_tokens) + 1, (target_logits.shape, len(draft_tokens))
    target_tokens = target_logits.argmax(dim=-1).tolist()
    kids = tree.children(parents)
    path: list[int] = []
    row = 0
    while True:
        match = next((c for c in kids[row] if draft_tokens[c] == target_tokens[row]), None)
        if match is None:
            return TreeVerdict(tuple(path), target_tokens[row], NextTokenKind.BONUS)
        path.append(match)
        row = match + 1


def verify_tree_sampling(
    draft_tokens: Sequence[int],
    parents: Sequence[int],
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator,
) -> TreeVerdict:
    """Recursive rejection sampling down a tree (Jeon et al., arXiv 2402.14160).

    At each node its children are tried in order. The drafter must have drawn them *without
    replacement* from one distribution q (each child's draft_probs row is that q; None = one-hot
    drafts). A child x is accepted with probability min(1, p[x] / q[x]); on rejection the target
    side becomes norm(max(0, p - q)) and q loses x (renormalised), which keeps the output
    distributed as the target's. With no child accepted, the next token is drawn from what is left.
    draft_probs: [N, V] or None · target_probs: [N + 1, V] (row 0 the pending token's).
    """
    assert target_probs.shape[0] == len(draft_tokens) + 1, (target_probs.shape, len(draft_tokens))
    kids = tree.children(parents)
    path: list[int] = []
    row = 0
    while True:
        probs, draft, accepted = target_probs[row], None, None
        for child in kids[row]:
            token = draft_tokens[child]
            if draft_probs is not None and draft is None:
                draft = draft_probs[child].clone()
            draft_at_token = 1.0 if draft is None else float(draft[token])
            if float(torch.rand((), generator=generator)) * draft_at_token < float(probs[token]):
                accepted = child
                break
            probs = _residual(probs, draft, torch.tensor(token))
            if draft is not None:
                draft[token] = 0.0
                draft = draft / draft.sum() if draft.sum() > 0 else draft
        if accepted is None:
            kind = NextTokenKind.RECOVERED if kids[row] else NextTokenKind.BONUS
            return TreeVerdict(tuple(path), sample(probs, generator), kind)
        path.append(accepted)
        row = accepted + 1
