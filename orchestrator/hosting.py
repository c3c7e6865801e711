"""A request's loop run inside a service (`Verifier.Generate` or `Drafter.Generate`).

Run in the orchestrator, a round costs four messages (block from the drafter, block to the
verifier, result back, result on to the drafter) and the orchestrator's own scheduling. Run beside
the target or beside the drafter, one of the two is a local call and the other one message each
way. The loop is `orchestrator.loop.speculate` itself, over the hosting service's own sessions.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from orchestrator.loop import Chunk, speculate
from orchestrator.protocols import Drafter, Verifier
from orchestrator.remote_loop import LoopRequest
from orchestrator.stopping import StopChecker
from speculum.errors import InvalidArgument


@dataclass(frozen=True)
class HostedLoops:
    """Runs requests' loops here. verifier and drafter: a local one and the other service's client
    (possibly metered); eos_token_ids and decode: the target's, for stop conditions (without decode,
    a request with stop strings is INVALID_ARGUMENT)."""

    verifier: Verifier
    drafter: Drafter | None
    eos_token_ids: frozenset[int]
    decode: Callable[[Sequence[int]], str] | None = None

    def run(self, request: LoopRequest) -> Iterator[Chunk]:
        stop = StopChecker(request.sampling.max_new_tokens, self.eos_token_ids, request.sampling.stop,
                           self.decode or _no_decoder, preceding=request.emitted)
        return speculate(request.prompt, request.sampling, request.speculation, self.verifier, self.drafter, stop)


def _no_decoder(token_ids: Sequence[int]) -> str:
    raise InvalidArgument("sampling.stop", "this service has no tokenizer to match stop strings")


def serve_stream(chunks: Iterator[Chunk], to_proto, context, final_only: bool = False) -> Iterator:
    """Yield `chunks` as protos until they end or the call does (cancelled, past its deadline);
    with `final_only`, one proto at the end holding every chunk's tokens.

    gRPC stops pulling from a cancelled call's handler without closing it, so the call's end also
    closes the loop (releasing both sessions) when the loop is parked between rounds; a loop in the
    middle of a round sees the call inactive after it and is closed here.
    """
    stepping = threading.Lock()

    def on_end() -> None:
        if stepping.acquire(blocking=False):
            try:
                chunks.close()
            finally:
                stepping.release()

    context.add_callback(on_end)
    held: list[int] = []
    try:
        while context.is_active():
            with stepping:
                chunk = next(chunks, None)
            if chunk is None:
                return
            if final_only and chunk.finish is None:
                held.extend(chunk.token_ids)
                continue
            if held:
                chunk = dataclasses.replace(chunk, token_ids=(*held, *chunk.token_ids))
            yield to_proto(chunk)
    finally:
        with stepping:
            chunks.close()
