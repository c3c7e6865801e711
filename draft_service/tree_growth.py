"""Growing a candidate tree level by level (EAGLE-2's dynamic tree), for any drafter.

Each level expands the `width` best nodes of the level above (best = highest cumulative draft
log-probability) and gives each `width` children, down to the round's depth. Greedy requests take
each node's top children, then keep the `nodes` best of everything grown (EAGLE-2's re-ranking;
a child never outscores its parent, so the kept set is a tree). Sampling requests draw children
*without replacement* from the drafter's transformed distribution (Gumbel top-k) and stop growing
at the budget instead: whether a child is kept must never depend on the token drawn for it, which
is what keeps recursive rejection sampling (speculum.rejection.verify_tree_sampling) lossless.
The drafter supplies only `expand`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from speculum.config import SamplingParams
from speculum.records import DraftBlock
from speculum.sampling import probs_from_logits
from speculum.tree import TreeShape

# expand(nodes, tokens, parents) -> logits [len(nodes), V] for the children of each of `nodes`,
# given the tree so far (node i has token tokens[i] under parents[i]).
Expand = Callable[[list[int], list[int], list[int]], torch.Tensor]


def grow_tree(
    root_logits: torch.Tensor,
    expand: Expand,
    shape: TreeShape,
    depth: int,
    sampling: SamplingParams,
    generator: torch.Generator,
) -> DraftBlock:
    """A candidate tree after the pending token. root_logits: [V], the drafter's next-token logits."""
    budget = shape.budget(depth)
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    rows: list[torch.Tensor] = []  # per node: the distribution it was drawn from (sampling only)
    chosen, logits = [-1], root_logits[None]
    for level in range(depth):
        if level:
            previous = [n for n in range(len(tokens)) if _level_of(parents, n) == level - 1]
            chosen = sorted(previous, key=lambda n: -scores[n])[: shape.width]
            logits = expand(chosen, tokens, parents)
        for parent, parent_logits in zip(chosen, logits):
            room = shape.width if sampling.greedy else min(shape.width, budget - len(tokens))
            if room <= 0:
                break
            if sampling.greedy:
                log_probs = torch.log_softmax(parent_logits.float(), dim=-1)
                picked = log_probs.topk(room).indices
            else:
                probs = probs_from_logits(parent_logits[None], sampling)[0]
                log_probs = probs.log()
                picked = _sample_without_replacement(log_probs, room, generator)
            base = 0.0 if parent < 0 else scores[parent]
            for token in picked.tolist():
                tokens.append(token)
                parents.append(parent)
                scores.append(base + float(log_probs[token]))
                if not sampling.greedy:
                    rows.append(probs)
        if not sampling.greedy and len(tokens) >= budget:
            break
    if sampling.greedy:
        return _best_subtree(tokens, parents, scores, budget)
    return DraftBlock(tuple(tokens), torch.stack(rows) if rows else None, tuple(parents))


def _best_subtree(tokens: list[int], parents: list[int], scores: list[float], budget: int) -> DraftBlock:
    """The `budget` highest-scoring nodes, renumbered in their original (parents-first) order."""
    ranked = sorted(range(len(tokens)), key=lambda n: (-scores[n], n))  # ties: the shallower first
    kept = sorted(ranked[:budget])
    new_index = {node: i for i, node in enumerate(kept)}
    assert all(parents[n] < 0 or parents[n] in new_index for n in kept), "a kept node lost its parent"
    return DraftBlock(tuple(tokens[n] for n in kept), None, tuple(-1 if parents[n] < 0 else new_index[parents[n]] for n in kept))


def _level_of(parents: list[int], node: int) -> int:
    level = 0
    while parents[node] >= 0:
        node, level = parents[node], level + 1
    return level


def _sample_without_replacement(log_probs: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct tokens in the order sequential draws without replacement would give
    (Gumbel top-k); fewer when fewer tokens have probability > 0. log_probs: [V]."""
    uniform = torch.rand(log_probs.shape, generator=generator).clamp_(1e-20, 1.0)
    keys = log_probs - torch.log(-torch.log(uniform))
    possible = int((log_probs > float("-inf")).sum())
    return keys.topk(min(count, possible)).indices
