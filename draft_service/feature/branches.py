"""A look-ahead that covers the likely outcomes of the block under verification, in two forwards.

Pipelined mode drafts the next block while the verifier checks block b (m tokens). A look-ahead that
assumes b is accepted in full is kept in only about half the rounds; yet when b is rejected at j,
the verifier's token there is usually the drafter's best alternative at j (82% of the rejections of
the demo pair's descriptions). So the look-ahead drafts for every outcome it can guess:
- accepted in full, then one of the drafter's two best guesses g1, g2 for the bonus token: the main
  block is a tree whose roots are g1 and g2, each with the block after it below;
- rejected at j < m with the drafter's best alternative c_j (a token other than b[j]): a Branch.

Forward A feeds the rows of b and of every c_j with tree attention (c_j sees b[:j] and itself);
forward B feeds g1 and g2 after all of b. Each row's semi-AR features give the k tokens after it,
so a branch's block has at most k tokens. Rows fed here are speculative: the next `advance` cuts
them off. Which block is kept depends only on the verifier's settled tokens, so verification stays
exact; a wrong guess only costs the look-ahead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from draft_service.feature.layer import LayerCache
from draft_service.feature.model import FeatureDraftModel
from speculum.records import Branch, DraftBlock

Choose = Callable[[torch.Tensor], DraftBlock]  # logits [n, V] -> a block of n tokens (greedy or sampled)


def branching_lookahead(model: FeatureDraftModel, cache: LayerCache, features: torch.Tensor,
                        assume: Sequence[int], max_tokens: int, choose: Choose) -> DraftBlock:
    """features [k, D]: predicted after the cache's last (real) row; `assume` (m <= k tokens) is the
    block under verification; `max_tokens` counts the bonus guess, as in a chain look-ahead."""
    k, m = features.shape[0], len(assume)
    assert 0 < m <= k and max_tokens > 1, (m, k, max_tokens)
    width = min(k, max_tokens - 1)
    real = cache.length
    alternatives = [_best_other(row, token) for row, token in zip(model.logits(features[:m]), assume)]
    # forward A: the rows of b (a chain) and of each alternative c_j (beside b[j])
    tokens = torch.tensor([*assume, *alternatives])
    rows = model.fuse(model.embed(tokens), torch.cat([features[:m], features[:m]]))
    visible = torch.zeros(2 * m, real + 2 * m, dtype=torch.bool)
    visible[:, :real] = True
    for j in range(m):
        visible[j, real : real + j + 1] = True  # b[j] sees b[:j+1]
        visible[m + j, real : real + j] = True  # c_j sees b[:j] ...
        visible[m + j, real + m + j] = True  # ... and itself
    positions = torch.tensor([[*range(real, real + m), *range(real, real + m)]])
    out = model(rows[None], cache, visible[None, None], positions)[0]  # [2m, k, D]
    after_block = out[m - 1, 0]  # predicts the bonus token
    bonus_logits = model.logits(after_block)
    first = int(bonus_logits.argmax())
    guesses = [first, _best_other(bonus_logits, first)]
    # forward B: the two guesses after the whole of b
    rows = model.fuse(model.embed(torch.tensor(guesses)), after_block.expand(2, -1))
    visible = torch.zeros(2, real + 2 * m + 2, dtype=torch.bool)
    visible[:, : real + m] = True
    visible[0, real + 2 * m] = visible[1, real + 2 * m + 1] = True
    guessed = model(rows[None], cache, visible[None, None], torch.full((1, 2), real + m))[0]  # [2, k, D]
    main = _rooted(guesses, [choose(logits) for logits in model.logits(guessed[:, :width])], bonus_logits)
    after_alternatives = model.logits(out[m:, :width])  # [m, width, V]
    branches = tuple(Branch(j, alternatives[j], choose(after_alternatives[j])) for j in range(m))
    return dataclasses.replace(main, branches=branches)


def _best_other(logits: torch.Tensor, token: int) -> int:
    """The most likely token other than `token` under `logits` [V]."""
    top = logits.topk(2).indices.tolist()
    return top[1] if top[0] == token else top[0]


def _rooted(roots: list[int], below: list[DraftBlock], root_logits: torch.Tensor) -> DraftBlock:
    """A tree with `roots` side by side, each with its chain `below[i]` under it (nodes in order)."""
    tokens, parents = [], []
    for root, chain in zip(roots, below):
        top = len(tokens)
        tokens.append(root)
        parents.append(-1)
        tokens.extend(chain.tokens)
        parents.extend(range(top, top + len(chain.tokens)))
    probs = None
    if below[0].draft_probs is not None:  # sampling: every chain has them
        # a root is a guess, never verified: its row is the drafter's distribution there
        root_row = torch.softmax(root_logits.float(), -1)[None]
        probs = torch.cat([row for chain in below for row in (root_row, chain.draft_probs)])
    return DraftBlock(tuple(tokens), probs, tuple(parents))
