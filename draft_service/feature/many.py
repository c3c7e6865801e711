"""Many feature-draft sessions' rounds in lockstep: each step's rows of every session in one forward.

Each session's round is its `plan` (session.py); this driver steps all plans together and runs the
`Rows` they ask for through `FeatureDraftModel.forward_many`. A session whose plan fails gets its
own exception; its neighbours go on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from draft_service.feature.model import FeatureDraftModel
from draft_service.feature.session import FeatureDraftSession, Rows
from speculum.records import DraftBlock


@dataclass(frozen=True)
class Round:
    """One session's next round: draft up to `max_tokens` after the `assume`d tokens."""

    session: FeatureDraftSession
    max_tokens: int
    assume: tuple[int, ...] = ()


@torch.inference_mode()
def draft_many(model: FeatureDraftModel, rounds: Sequence[Round]) -> list[list[DraftBlock] | Exception]:
    """The blocks of every round (as `propose` would yield them), or the exception its plan raised."""
    plans = [r.session.plan(r.max_tokens, r.assume) for r in rounds]
    results: list[list[DraftBlock] | Exception] = [[] for _ in rounds]
    replies: list[torch.Tensor | None] = [None] * len(rounds)
    pending = list(range(len(rounds)))
    while pending:
        needs: dict[int, torch.Tensor] = {}
        for i in pending:
            step = _advance(plans[i], replies[i], results, i)
            while isinstance(step, DraftBlock):
                results[i].append(step)
                step = _advance(plans[i], None, results, i)
            if isinstance(step, Rows):
                needs[i] = step.rows
        pending = list(needs)
        if pending:
            try:
                features = model.forward_many([needs[i] for i in pending], [rounds[i].session.cache for i in pending])
            except Exception as exc:  # a bug, not bad input: these rounds fail, their callers fall back
                for i in pending:
                    results[i] = exc
                return results
            for row, i in enumerate(pending):
                replies[i] = features[row]
    return results


def _advance(plan, reply, results: list, i: int) -> Rows | DraftBlock | None:
    """The plan's next step, or None when it is done (or failed: its result becomes the exception)."""
    try:
        return plan.send(reply)
    except StopIteration:
        return None
    except Exception as exc:
        results[i] = exc
        return None
