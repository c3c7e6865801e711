"""A look-ahead that covers the likely outcomes of the block under verification, in a few forwards.

Pipelined mode drafts the next block while the verifier checks block b (m tokens). A look-ahead that
assumes b is accepted in full is kept in only about half the rounds; yet when b is rejected at j,
the verifier's token there is usually the drafter's best alternative at j (82% of the rejections of
the demo pair's descriptions). So the look-ahead drafts for every outcome it can guess:
- accepted in full, then one of the drafter's two best guesses g1, g2 for the bonus token: the main
  block is a tree whose roots are g1 and g2, each with the block after it below;
- rejected at j < m with the drafter's best alternative c_j (a token other than b[j]): a Branch,
  at the (at most MAX_BRANCHES) positions where the drafter's own probabilities make a rejection
  likeliest.

Forward A feeds the rows of b and of those c_j with tree attention (c_j sees b[:j] and itself), k
rows of b per forward (a block longer than k takes the features of its later rows from b[k - 1]'s
row); forward B feeds g1 and g2 after all of b. Each row's semi-AR features give the k tokens after
it; the chains below the guesses and the alternatives then go on together, k tokens per forward,
to the length asked for. Only rows whose outputs are read run their queries and MLP; the others
only join the cache. When b is a chain the drafter drafted itself (the block it just proposed, or
the chain of the last look-ahead that the verification kept), b's rows are fed from the features
its tokens were drafted from, all in one forward, together with the verified rows not yet fed:
K = 8 with k = 4 then takes 3 forwards instead of 5 (median look-ahead 3.8 against 5.0 ms, one
thread) for as many rounds drafted ahead (simulated: 441 rounds against 440). Rows fed here are speculative: the next `advance` cuts them off.
Which block is kept depends only on the verifier's settled tokens, so verification stays
exact; a wrong guess only costs the look-ahead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from draft_service.feature.layer import LayerCache
from draft_service.feature.model import FeatureDraftModel
from speculum.records import Branch, DraftBlock, join_pieces

# Branches per look-ahead, at the likeliest rejections, each at least this likely (by the drafter's
# probabilities). On the demo pair's held-out descriptions at K = 8, the 3 likeliest positions hold
# 91% of the rejections, and these limits cut a look-ahead's cost by about a third for as many
# rounds (throwaway probe, the simulation of draft_service.training.evaluate).
MAX_BRANCHES = 3
MIN_REJECTION = 0.05

Choose = Callable[[torch.Tensor], DraftBlock]  # logits [n, V] -> a block of n tokens (greedy or sampled)


@dataclasses.dataclass(frozen=True)
class Carried:
    """A chain a look-ahead drafted below one root (a bonus guess or an alternative), with the feature
    each of its tokens was predicted from: if the verifier settles on that root, the next look-ahead
    feeds the chain's rows from these instead of predicting them again."""

    tokens: tuple[int, ...]
    features: torch.Tensor  # [len(tokens), D]

    def covers(self, block: Sequence[int]) -> bool:
        return 0 < len(block) <= len(self.tokens) and tuple(block) == self.tokens[: len(block)]


@dataclasses.dataclass(frozen=True)
class Lookahead:
    """A look-ahead's block (main tree plus branches), its chains by the outcome that keeps them:
    (accepted count, the verifier's token there) -> Carried, and, when it fed real rows, the features
    predicted after the last of them."""

    block: DraftBlock
    chains: dict[tuple[int, int], Carried]
    after_real: torch.Tensor | None = None  # [k, D]


def branching_lookahead(model: FeatureDraftModel, cache: LayerCache, features: torch.Tensor | None,
                        assume: Sequence[int], max_tokens: int, choose: Choose,
                        unfed: torch.Tensor | None = None, drafted_from: torch.Tensor | None = None) -> Lookahead:
    """`assume` (m tokens) is the block under verification; `max_tokens` counts the bonus guess, as in
    a chain look-ahead. Either `features` [k, D], predicted after the cache's last (real) row, and b's
    rows are fed k per forward from them as a chain feeds them; or `drafted_from` [m, D], the features
    b's tokens were drafted from (a chain carried over from the previous look-ahead, or the block just
    proposed), and all of b's rows go in one forward together with `unfed` [P, D], the real rows of
    the last verification not yet in the cache (the look-ahead then predicts from the drafter's own
    earlier features for b, which costs acceptance little and saves the forwards)."""
    m = len(assume)
    assert 0 < m and max_tokens > 1, (m, max_tokens)
    after_real = None
    if drafted_from is None:
        real = cache.length
        block_rows, alternative_out, alternatives, alternative_rows, branch_at, after_block = \
            _feed_block_by_k(model, cache, features, assume, real)
    else:
        assert drafted_from.shape[0] == m, (drafted_from.shape, m)
        real, after_real, block_rows, alternative_out, alternatives, alternative_rows, branch_at, after_block = \
            _feed_block_at_once(model, cache, drafted_from, assume, unfed)
    bonus_logits = model.logits(after_block)
    first = int(bonus_logits.argmax())
    guesses = [first, _best_other(bonus_logits, first)]
    # forward B: the two guesses after the whole of b
    rows = model.fuse(model.embed(torch.tensor(guesses)), after_block.expand(2, -1))
    base = cache.length
    visible = torch.zeros(2, base + 2, dtype=torch.bool)
    visible[:, :real] = True
    visible[:, block_rows] = True
    visible[0, base] = visible[1, base + 1] = True
    guessed = model(rows[None], cache, visible[None, None], torch.full((1, 2), real + m))[0]  # [2, k, D]
    # the chains below the guesses (which see all of b) and below the alternatives (c_j sees b[:j]), together
    seen = [[*block_rows, base], [*block_rows, base + 1],
            *([*block_rows[:j], row] for j, row in zip(branch_at, alternative_rows))]
    positions = [real + m + 1] * 2 + [real + j + 1 for j in branch_at]
    chains, chain_features = _chains_below(model, cache, torch.cat([guessed, *alternative_out]), real, seen,
                                           positions, max_tokens - 1, choose)
    main = _rooted(guesses, chains[:2], bonus_logits)
    branches = tuple(Branch(j, c, chain) for j, c, chain in zip(branch_at, alternatives, chains[2:]))
    outcomes = [(m, g) for g in guesses] + list(zip(branch_at, alternatives))
    carried = {outcome: Carried(chain.tokens, feats)
               for outcome, chain, feats in zip(outcomes, chains, chain_features)}
    return Lookahead(dataclasses.replace(main, branches=branches), carried, after_real)


def _feed_block_by_k(model: FeatureDraftModel, cache: LayerCache, features: torch.Tensor, assume: Sequence[int],
                     real: int):
    """Forward A, k rows of b per forward (the features of b[k:] come from b[k - 1]'s row): the rows
    of b (a chain) and of the alternatives c_j beside b[j] where a rejection is likely enough."""
    k, m = features.shape[0], len(assume)
    block_rows: list[int] = []  # cache rows of b, fed so far
    alternative_out, alternatives, alternative_rows, branch_at = [], [], [], []
    reach = 1.0  # the drafter's probability that the verifier gets this far into b
    for start in range(0, m, k):
        chunk = list(assume[start : start + k])
        n, base = len(chunk), cache.length
        chosen, reach = _likely_rejections(model.logits(features[:n]), chunk, start, reach,
                                           MAX_BRANCHES - len(branch_at))
        c = len(chosen)
        tokens = torch.tensor([*chunk, *(token for _, token in chosen)])
        inputs = torch.cat([features[:n], features[[j - start for j, _ in chosen]]]) if c else features[:n]
        rows = model.fuse(model.embed(tokens), inputs)
        visible = torch.zeros(n + c, base + n + c, dtype=torch.bool)
        visible[:, :real] = True
        visible[:, block_rows] = True  # b[:start]
        for j in range(n):
            visible[j, base : base + j + 1] = True  # b[start + j] sees b[:start + j + 1]
        for i, (j, _) in enumerate(chosen):
            visible[n + i, base : base + j - start] = True  # c_j sees b[:j] ...
            visible[n + i, base + n + i] = True  # ... and itself
        positions = torch.tensor([[*range(real + start, real + start + n), *(real + j for j, _ in chosen)]])
        # outputs of b's last row and of the alternatives' rows: the other rows only join the cache
        out = model(rows[None], cache, visible[None, None], positions, only=torch.arange(n - 1, n + c))[0]
        block_rows += range(base, base + n)
        alternative_rows += range(base + n, base + n + c)
        alternative_out.append(out[1:])  # [c, k, D]
        alternatives += [token for _, token in chosen]
        branch_at += [j for j, _ in chosen]
        features = out[0]  # predicted after b[start + n - 1]
    return block_rows, alternative_out, alternatives, alternative_rows, branch_at, features[0]


def _feed_block_at_once(model: FeatureDraftModel, cache: LayerCache, drafted_from: torch.Tensor,
                        assume: Sequence[int], unfed: torch.Tensor | None):
    """Forward A in one: the real rows `unfed` (causal), then all of b from the features its tokens
    were drafted from, then the alternatives c_j (seeing b[:j] and themselves)."""
    p = 0 if unfed is None else len(unfed)
    start, m = cache.length, len(assume)
    real = start + p
    chosen, _ = _likely_rejections(model.logits(drafted_from), list(assume), 0, 1.0, MAX_BRANCHES)
    c = len(chosen)
    tokens = torch.tensor([*assume, *(token for _, token in chosen)])
    inputs = torch.cat([drafted_from, drafted_from[[j for j, _ in chosen]]]) if c else drafted_from
    rows = model.fuse(model.embed(tokens), inputs)
    if p:
        rows = torch.cat([unfed, rows])
    visible = torch.zeros(p + m + c, real + m + c, dtype=torch.bool)
    visible[:, :start] = True
    visible[:p, start:real] = torch.ones(p, p, dtype=torch.bool).tril()
    visible[p:, start:real] = True
    visible[p : p + m, real : real + m] = torch.ones(m, m, dtype=torch.bool).tril()
    for i, (j, _) in enumerate(chosen):
        visible[p + m + i, real : real + j] = True
        visible[p + m + i, real + m + i] = True
    positions = torch.tensor([[*range(start, real + m), *(real + j for j, _ in chosen)]])
    only = torch.tensor([*([p - 1] if p else []), *range(p + m - 1, p + m + c)])
    out = model(rows[None], cache, visible[None, None], positions, only=only)[0]
    after_real, out = (out[0], out[1:]) if p else (None, out)
    return (real, after_real, list(range(real, real + m)), [out[1:]], [t for _, t in chosen],
            list(range(real + m, real + m + c)), [j for j, _ in chosen], out[0][0])


def _chains_below(model: FeatureDraftModel, cache: LayerCache, after: torch.Tensor, real: int,
                  seen: list[list[int]], positions: list[int], length: int,
                  choose: Choose) -> tuple[list[DraftBlock], list[torch.Tensor]]:
    """A chain of `length` tokens below each of R roots, k per forward (all roots' rows in one
    forward, as a chain feeds them), and the features [length, D] each chain's tokens were predicted
    from. after [R, k, D]: the features predicted after each root's row; seen[r]: the cache rows root
    r sees beyond the real ones (itself included); positions[r]: the position of its first token."""
    k = after.shape[1]
    roots = len(seen)
    pieces: list[list[DraftBlock]] = [[] for _ in range(roots)]
    used: list[torch.Tensor] = []  # [R, width, D] per step
    seen = [list(rows) for rows in seen]
    drafted = 0
    while True:
        width = min(k, length - drafted)
        blocks = [choose(logits) for logits in model.logits(after[:, :width])]
        for chain, block in zip(pieces, blocks):
            chain.append(block)
        used.append(after[:, :width])
        drafted += width
        if drafted >= length:
            return [join_pieces(chain) for chain in pieces], list(torch.cat(used, dim=1))
        # the drafted tokens with the features they were predicted from are the next rows
        tokens = torch.tensor([t for block in blocks for t in block.tokens])
        rows = model.fuse(model.embed(tokens), after[:, :width].reshape(roots * width, -1))
        base = cache.length
        visible = torch.zeros(roots * width, base + roots * width, dtype=torch.bool)
        visible[:, :real] = True
        for r in range(roots):
            own = range(base + r * width, base + (r + 1) * width)
            for t in range(width):
                visible[r * width + t, seen[r]] = True
                visible[r * width + t, own[0] : own[t] + 1] = True
            seen[r] += own
        at = torch.tensor([[p + drafted - width + t for p in positions for t in range(width)]])
        last = torch.arange(1, roots + 1) * width - 1
        after = model(rows[None], cache, visible[None, None], at, only=last)[0]  # [R, k, D]: after each chain


def _likely_rejections(logits: torch.Tensor, chunk: list[int], start: int, reach: float,
                       room: int) -> tuple[list[tuple[int, int]], float]:
    """The positions of b (chunk = b[start:start + n], logits [n, V] the drafter's there) worth a
    branch: at most `room`, the likeliest rejections first, each at least MIN_REJECTION likely by the
    drafter's own probabilities -> ([(j, c_j)] in position order, the probability of getting past
    the chunk). `reach`: the probability of getting to b[start]."""
    probs = torch.softmax(logits.float(), -1)
    candidates = []
    for j, token in enumerate(chunk):
        p = float(probs[j, token])
        if reach * (1 - p) >= MIN_REJECTION:
            candidates.append((reach * (1 - p), start + j, _best_other(logits[j], token)))
        reach *= p
    likeliest = sorted(candidates, reverse=True)[: max(room, 0)]
    return sorted((j, token) for _, j, token in likeliest), reach


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
