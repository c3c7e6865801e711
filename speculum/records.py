"""The values that travel between the loop, the drafter and the verifier (in-process or over gRPC).

Plain frozen dataclasses: no protobuf, no model objects. Token ids are tuples of ints; bulk
features are tensors whose shapes are documented and asserted where they are built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speculum.rejection import NextTokenKind


@dataclass(frozen=True)
class PromptInputs:
    """A tokenized prompt.

    token_ids: the chat-templated prompt with ONE image-token id per image; each model expands it
        to its own number of visual tokens.
    pixel_values: [I, 3, H, W] preprocessed images, or None.
    visual_embeds: [I, N, D] projected visual embeddings computed elsewhere (the vision encoder),
        used instead of pixel_values by the target when present.
    drafter_latents: [I, C, D'] compressed visual latents for a feature-level drafter, or None.
    """

    token_ids: tuple[int, ...]
    pixel_values: torch.Tensor | None = None
    visual_embeds: torch.Tensor | None = None
    drafter_latents: torch.Tensor | None = None

    @property
    def num_images(self) -> int:
        if self.visual_embeds is not None:
            return self.visual_embeds.shape[0]
        return 0 if self.pixel_values is None else self.pixel_values.shape[0]


@dataclass(frozen=True)
class DraftBlock:
    """Candidate tokens proposed in one round, continuing after the verifier's pending token.

    tokens: [K] proposed ids (K may be 0: the verifier then just decodes one token).
    draft_probs: [K, V] the drafter's transformed distributions when sampling; None for greedy
        requests and for drafters without probabilities (treated as one-hot drafts).
    parents: for a candidate tree, the parent index of each token (-1 = the pending token);
        None means a chain.
    branches: a look-ahead's blocks for the other ways the assumed tokens may settle (see Branch);
        empty everywhere else.
    """

    tokens: tuple[int, ...]
    draft_probs: torch.Tensor | None = None
    parents: tuple[int, ...] | None = None
    branches: tuple[Branch, ...] = ()

    def __post_init__(self) -> None:
        if self.draft_probs is not None:
            assert self.draft_probs.dim() == 2 and self.draft_probs.shape[0] == len(self.tokens), self.draft_probs.shape
        if self.parents is not None:
            assert len(self.parents) == len(self.tokens), (self.parents, self.tokens)

    @property
    def is_chain(self) -> bool:
        return self.parents is None or all(p == i - 1 for i, p in enumerate(self.parents))

    @property
    def tree_parents(self) -> tuple[int, ...]:
        """`parents`, with a chain's spelled out ((-1, 0, 1, ...)), for code that treats both as trees."""
        return self.parents if self.parents is not None else tuple(range(-1, len(self.tokens) - 1))


@dataclass(frozen=True)
class Branch:
    """A look-ahead's block for one rejection: the verifier accepts the first `accepted` assumed
    tokens and then settles on `token` (the drafter's best guess for it); `block` continues after."""

    accepted: int
    token: int
    block: DraftBlock


def join_pieces(pieces: list[DraftBlock]) -> DraftBlock:
    """One chain block from the pieces a drafter streamed, in order (branches come on the last)."""
    if len(pieces) == 1:
        return pieces[0]
    tokens = tuple(t for piece in pieces for t in piece.tokens)
    branches = pieces[-1].branches if pieces else ()
    probs = [piece.draft_probs for piece in pieces if piece.tokens]
    if any(p is None for p in probs) or not probs:
        return DraftBlock(tokens, branches=branches)
    return DraftBlock(tokens, torch.cat(probs), branches=branches)


@dataclass(frozen=True)
class VerifyResult:
    """What one target forward pass settled (prefill or verification).

    tokens: the accepted draft tokens, then the next token (bonus or recovered); after a prefill,
        just the first generated token. len(tokens) == num_accepted + 1.
    hidden: [P, D] the target's last-layer (post-norm) hidden states at the positions this pass
        committed: the whole prompt after a prefill, else the pending token and the accepted
        drafts. Row j is the state from which the token after position j is predicted. None when
        the drafter does not use target features (they are then not sent over the wire).
    queue_depth: the verifier's load: verify calls already in flight there when this one arrived
        (0 = it had the verifier to itself; always 0 in-process). The adaptive draft length reads it.
    """

    num_accepted: int
    tokens: tuple[int, ...]
    next_kind: NextTokenKind
    hidden: torch.Tensor | None = None
    queue_depth: int = 0

    def __post_init__(self) -> None:
        assert len(self.tokens) == self.num_accepted + 1, (self.tokens, self.num_accepted)

    @property
    def next_token(self) -> int:
        return self.tokens[-1]


def join_results(earlier: VerifyResult, later: VerifyResult) -> VerifyResult:
    """Two consecutive results as one, for a drafter that has not seen the earlier one yet.

    A drafter reads only the tokens and the feature rows; both still pair up (row j predicts token
    j + 1) after concatenation, because the earlier result's last token is the later one's pending row.
    """
    hidden = None
    if earlier.hidden is not None and later.hidden is not None:
        hidden = torch.cat([earlier.hidden, later.hidden])
    tokens = (*earlier.tokens, *later.tokens)
    return VerifyResult(len(tokens) - 1, tokens, later.next_kind, hidden, later.queue_depth)
