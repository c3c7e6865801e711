"""The speculative loop run beside the target (`Verifier.Generate`).

Run in the orchestrator, a round costs four messages (block from the drafter, block to the
verifier, result back, result on to the drafter) and the orchestrator's own scheduling. Run here,
the target is a local call and the drafter is one message each way over its DraftRounds stream;
the target's features go to the drafter directly. The loop is `orchestrator.loop.speculate`
itself, over a Verifier that uses this service's own sessions, limits, batcher and device lock.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from orchestrator.loop import Chunk, speculate
from orchestrator.protocols import Drafter, Verifier
from orchestrator.remote_loop import LoopRequest
from orchestrator.stopping import StopChecker
from speculum.config import SamplingParams
from speculum.records import DraftBlock, PromptInputs, VerifyResult


class LocalVerifySession:
    """One session of this service's store, driven from this process (no RPC)."""

    def __init__(self, servicer, sampling: SamplingParams, return_features: bool):
        self._servicer = servicer
        self._sampling = sampling
        self._return_features = return_features
        self.session_id = f"h-{uuid.uuid4().hex}"
        self._open = False

    def prefill(self, prompt: PromptInputs) -> VerifyResult:
        self._open = True
        return self._servicer.prefill(self.session_id, self._sampling, self._return_features, prompt)

    def verify(self, block: DraftBlock) -> VerifyResult:
        return self._servicer.verify(self.session_id, block)[0]

    def close(self) -> None:
        if self._open:
            self._open = False
            self._servicer.sessions.release(self.session_id)


class LocalVerifier:
    """The Verifier protocol over the verify servicer's sessions (limits, TTL, batching, metrics)."""

    def __init__(self, servicer):
        self._servicer = servicer

    def open(self, sampling: SamplingParams, return_features: bool = False) -> LocalVerifySession:
        return LocalVerifySession(self._servicer, sampling, return_features)


@dataclass(frozen=True)
class HostedLoops:
    """Runs requests' loops here. verifier: a LocalVerifier (possibly metered); drafter: the draft
    service's client; eos_token_ids and decode: the target's, for stop conditions."""

    verifier: Verifier
    drafter: Drafter | None
    eos_token_ids: frozenset[int]
    decode: Callable[[Sequence[int]], str]

    def run(self, request: LoopRequest) -> Iterator[Chunk]:
        stop = StopChecker(request.sampling.max_new_tokens, self.eos_token_ids, request.sampling.stop, self.decode,
                           preceding=request.emitted)
        return speculate(request.prompt, request.sampling, request.speculation, self.verifier, self.drafter, stop)


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
