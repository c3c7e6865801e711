"""Pipelined speculation: draft the next block while the target verifies the current one.

While block n is verified, the drafter drafts ahead as if all of block n were accepted, starting
with its guess of the token the verifier adds after it. If block n is indeed accepted in full and
the guess is right, the look-ahead (minus the guess) is block n + 1, already drafted; otherwise it
is dropped and the next block is drafted as usual. A look-ahead tree covers several guesses at once:
its root's children are alternatives for that token. A look-ahead may also carry branches, blocks
for a rejection at a given position with a given token (the feature drafter guesses its best
alternative at each position, draft_service.feature.branches). Which look-ahead is kept depends only
on the verifier's settled tokens, so verification stays lossless (greedy and sampling).
"""

from __future__ import annotations

import contextvars
from concurrent.futures import Future, ThreadPoolExecutor

from speculum import tree
from speculum.records import DraftBlock, VerifyResult


class Lookahead:
    """The request's look-ahead drafting; `draft` is the loop's guarded draft session."""

    def __init__(self, draft, enabled: bool):
        self._draft = draft
        self._enabled = enabled
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lookahead") if enabled else None
        self._running: Future | None = None
        self._ready: DraftBlock | None = None
        self._shared = False  # the verifier had other requests' calls in flight at the last round
        self.hits = 0  # rounds whose block was drafted ahead

    def take(self, room: int) -> DraftBlock | None:
        """The block drafted ahead for this round (cut to `room` tokens), if there is one."""
        block, self._ready = self._ready, None
        if block is None or not block.tokens:
            return None
        self.hits += 1
        return _cut(block, room)

    def start(self, block: DraftBlock, max_tokens: int) -> None:
        """Begin drafting after `block` (being verified meanwhile): `max_tokens` beyond it, plus the guess."""
        if self._executor is None or not block.tokens or max_tokens <= 0 or not self._draft.active:
            return
        # A shared verifier gains more from batching aligned rounds than from hiding this request's
        # drafts (16 streams: 1.18x with look-aheads against 1.61x without, README).
        if self._shared:
            return
        # In the request's context, so the look-ahead's draft span joins the request's trace.
        context = contextvars.copy_context()
        self._running = self._executor.submit(context.run, self._draft.propose_ahead, max_tokens + 1, block.tokens)

    def settle(self, block: DraftBlock, result: VerifyResult) -> None:
        """Wait for the look-ahead (the draft session is free again after this) and keep the part
        that still holds after `result`, the verification of `block`."""
        self._shared = result.queue_depth > 0
        running, self._running = self._running, None
        if running is None:
            return
        self._ready = kept_block(running.result(), block, result)  # GuardedDraft never raises

    def close(self) -> None:
        """Waits for a look-ahead still drafting, so the draft session can be closed after it."""
        if self._running is not None:
            self._running.result()
            self._running = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)


def kept_block(ahead: DraftBlock, block: DraftBlock, result: VerifyResult) -> DraftBlock | None:
    """The part of the look-ahead `ahead` (drafted after `block`) that holds after `result`, the
    verification of `block`: the subtree under the verifier's next token if all of `block` was
    accepted, else the branch for that rejection, if the drafter drafted one; None when nothing holds."""
    if result.num_accepted == len(block.tokens):
        return _after_guess(ahead, result.next_token)
    if block.is_chain:  # rejected: a branch may have guessed where, and the verifier's token
        return next((branch.block for branch in ahead.branches
                     if (branch.accepted, branch.token) == (result.num_accepted, result.next_token)), None)
    return None


def _after_guess(ahead: DraftBlock, token: int) -> DraftBlock | None:
    """The look-ahead below its guess `token` (chain: the rest of it; tree: that child's subtree)."""
    parents = ahead.tree_parents
    found = tree.subtree_under(ahead.tokens, parents, token)
    if found is None:
        return None
    nodes, new_parents = found
    probs = None if ahead.draft_probs is None else ahead.draft_probs[nodes]
    is_chain = all(p == i - 1 for i, p in enumerate(new_parents))
    return DraftBlock(tuple(ahead.tokens[n] for n in nodes), probs, None if is_chain else tuple(new_parents))


def _cut(block: DraftBlock, room: int) -> DraftBlock:
    """At most `room` levels of `block` (a chain: its first `room` tokens)."""
    parents = block.tree_parents
    depths = tree.depths(parents)
    keep = [i for i, depth in enumerate(depths) if depth <= room]
    if len(keep) == len(block.tokens):
        return block
    new_index = {old: new for new, old in enumerate(keep)}  # ancestors are shallower: always kept
    probs = None if block.draft_probs is None else block.draft_probs[keep]
    new_parents = None if block.parents is None else tuple(-1 if parents[i] < 0 else new_index[parents[i]] for i in keep)
    return DraftBlock(tuple(block.tokens[i] for i in keep), probs, new_parents)
