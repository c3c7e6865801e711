"""The draft service: a thin gRPC servicer over a Drafter; streams each block in pieces, or, with a
batch window (SPECULUM_DRAFT_BATCH_WINDOW_MS), drafts concurrent sessions' rounds together.

Sessions are evicted (LRU) when the store is full: losing a draft session only costs speed, the
orchestrator then decodes with the target alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from draft_service.batching import DraftBatcher, batchable
from draft_service.hosted import LocalDrafter
from orchestrator.clients import GrpcVerifier, connect
from orchestrator.hosting import HostedLoops, serve_stream
from orchestrator.metered import MeteredDrafter, MeteredVerifier
from orchestrator.prompting import PromptBuilder
from orchestrator.protocols import DraftSession, Drafter, Verifier
from orchestrator.remote_loop import loop_chunk_to_proto, loop_request_from_proto
from speculum.config import SamplingParams
from speculum.errors import Unavailable
from speculum.metrics import RoundMetrics, SessionCollector, batch_collector, new_registry
from speculum.model_facts import ModelFacts
from speculum.records import DraftBlock, PromptInputs, VerifyResult, join_pieces
from speculum.rpc import convert
from speculum.rpc.server import RunningServer, run_until_signal, start_server
from speculum.rpc.settings import BatchSettings, ClientSettings, ServerSettings, SessionSettings
from speculum.rpc.status import mapped
from speculum.sessions import SessionStore
from speculum.telemetry import setup_tracing, tracer
from speculum.v1 import drafter_pb2, drafter_pb2_grpc
from speculum.v1.session_pb2 import ReleaseResponse

SERVICE_NAME = "speculum.v1.Drafter"
DEFAULT_PORT = 50063
VERIFY_TIMEOUT_S = 60.0  # a hosted loop's verify calls (prefill, rounds, release)


class DrafterServicer(drafter_pb2_grpc.DrafterServicer):
    """`loops` runs the requests' loops that Generate hosts here (set by `serve`)."""

    def __init__(self, drafter: Drafter, sessions: SessionSettings, batch: BatchSettings = BatchSettings()):
        self.drafter = drafter
        self.loops: HostedLoops | None = None
        self.sessions: SessionStore[DraftSession] = SessionStore(
            sessions.ttl_s, sessions.max_sessions, evict_when_full=True, close=lambda s: s.close()
        )
        self._device = threading.Lock()
        self.batcher = DraftBatcher(batch, self._device, lambda: len(self.sessions)) if batch.window_s > 0 else None

    @mapped
    def Info(self, request, context):
        return drafter_pb2.DrafterInfo(
            kind=type(self.drafter).__name__, needs_target_features=self.drafter.needs_target_features
        )

    @mapped
    def Prefill(self, request, context):
        self.prefill(request.session_id, convert.session_sampling_from_proto(request.sampling),
                     convert.prompt_from_proto(request.prompt), convert.result_from_proto(request.first))
        if not context.is_active():  # the caller gave up waiting (deadline): nobody would release it
            self.sessions.release(request.session_id)
            raise Unavailable("the caller is gone")
        return drafter_pb2.DrafterPrefillResponse()

    @mapped
    def Generate(self, request, context):
        if self.loops is None:
            raise Unavailable("this draft service hosts no loops: it has no verify service address")
        loop = loop_request_from_proto(request)
        yield from serve_stream(self.loops.run(loop), loop_chunk_to_proto, context, loop.final_only)

    def prefill(self, session_id: str, sampling: SamplingParams, prompt: PromptInputs, first: VerifyResult) -> None:
        """Open session `session_id` on the target's prefill result `first`."""
        session = self.drafter.open(sampling)
        try:
            with self._device:
                session.prefill(prompt, first)
        except BaseException:
            session.close()
            raise
        self.sessions.open(session_id, session)

    @mapped
    def Draft(self, request, context):
        yield from self._round(request)

    @mapped
    def DraftRounds(self, request_iterator, context):
        # The loop verifies a round's block whole, so the round goes as one message: each further
        # message costs both processes a send and a receive, each a wake-up of another thread on a
        # core that is busy with the model. `Draft` streams the pieces as they are drafted.
        for request in request_iterator:
            block = join_pieces(list(self._blocks(request)))
            if block.tokens:
                yield drafter_pb2.DraftPiece(block=convert.block_to_proto(block), end_of_round=True)
            else:
                yield drafter_pb2.DraftPiece(end_of_round=True)

    def _round(self, request):
        """Commit the request's `advance`, then the pieces of the next block as protos."""
        for block in self._blocks(request):
            yield convert.block_to_proto(block)

    def _blocks(self, request) -> Iterator[DraftBlock]:
        """Commit the request's `advance`, then the pieces of the next block."""
        advance = convert.result_from_proto(request.advance) if request.HasField("advance") else None
        yield from self.propose(request.session_id, advance, request.max_tokens, tuple(request.assume))

    def propose(self, session_id: str, advance: VerifyResult | None, max_tokens: int,
                assume: tuple[int, ...]) -> Iterator[DraftBlock]:
        """Commit `advance` (if any) in session `session_id`, then the pieces of its next block."""
        with self.sessions.use(session_id) as session:
            if advance is not None:
                session.advance(advance)
            # a look-ahead (assume) drafts alone: a feature session covers several outcomes then
            if self.batcher is not None and batchable(session) and not assume:
                with tracer().start_as_current_span("speculum.drafter.propose") as span:
                    blocks = self.batcher.draft(session, max_tokens, assume)
                    span.set_attribute("speculum.draft_tokens", sum(len(b.tokens) for b in blocks))
                yield from blocks
                return
            pieces = session.propose(max_tokens, assume)
            # One span per round rather than per piece: the loop's last `next` only finds the end.
            with tracer().start_as_current_span("speculum.drafter.propose") as span:
                drafted = 0
                span.set_attribute("speculum.draft_tokens", drafted)
                while True:
                    with self._device:
                        piece = next(pieces, None)
                    if piece is None:
                        break
                    drafted += len(piece.tokens)
                    span.set_attribute("speculum.draft_tokens", drafted)
                    yield piece

    @mapped
    def Release(self, request, context):
        return ReleaseResponse(released=self.sessions.release(request.session_id))


def serve(drafter: Drafter, settings: ServerSettings, sessions: SessionSettings,
          batch: BatchSettings = BatchSettings(), verifier: Verifier | None = None,
          eos_token_ids: frozenset[int] = frozenset(),
          decode: Callable[[Sequence[int]], str] | None = None) -> RunningServer:
    """`verifier`: the verify service's client for the loops this drafter hosts (without one,
    Generate is UNAVAILABLE); `eos_token_ids` and `decode`: the target's, for their stop
    conditions."""
    servicer = DrafterServicer(drafter, sessions, batch)
    registry = new_registry()
    if verifier is not None:
        # A hosted loop holds a worker thread for its whole request: one more per session it may hold.
        settings = dataclasses.replace(settings, max_workers=settings.max_workers + sessions.max_sessions)
        rounds = RoundMetrics(registry)
        servicer.loops = HostedLoops(MeteredVerifier(verifier, rounds), MeteredDrafter(LocalDrafter(servicer), rounds),
                                     eos_token_ids, decode)
    running = start_server(
        settings,
        [lambda server: drafter_pb2_grpc.add_DrafterServicer_to_server(servicer, server)],
        [SERVICE_NAME],
        servicer,
        collectors=[SessionCollector(servicer.sessions),
                    batch_collector(lambda: servicer.batcher and servicer.batcher.stats, "draft")],
        registry=registry,
    )
    return running


def _verifier_client(address: str, settings: ServerSettings) -> Verifier | None:
    """The verify service's client as the orchestrator would build it (TLS, deadline)."""
    if not address:
        return None
    clients = ClientSettings.from_env()
    return GrpcVerifier(connect(address, clients, settings.max_message_bytes), timeout_s=VERIFY_TIMEOUT_S,
                        rounds_stream=True)


def main(argv: list[str] | None = None) -> None:
    from draft_service.registry import load_drafter, target_vocab_size
    from speculum.logs import setup_logging
    from speculum.rpc.settings import tree_shape_from_env
    from speculum.threads import pin_from_env

    parser = argparse.ArgumentParser(description="Speculum draft service.")
    parser.add_argument("--target", type=Path, required=True, help="the target folder (vocabulary checks)")
    parser.add_argument("--drafter", required=True, help="ngram | DIR")
    parser.add_argument("--verifier-address", default=os.environ.get("SPECULUM_VERIFY_ADDRESS", ""),
                        help="host:port of the verify service, for the loops this drafter hosts "
                             "(default $SPECULUM_VERIFY_ADDRESS; empty: it hosts none)")
    args = parser.parse_args(argv)
    setup_logging("draft")
    setup_tracing("drafter")  # before the server is built: instrumentation patches grpc.server
    pin_from_env("DRAFT")
    settings = ServerSettings.from_env("DRAFT", DEFAULT_PORT)
    drafter = load_drafter(args.drafter, target_vocab_size(args.target), tree_shape=tree_shape_from_env())
    if drafter is None:
        raise SystemExit("the draft service needs a drafter (ngram or a folder), not none")
    facts = ModelFacts.from_pretrained(args.target)
    running = serve(drafter, settings, SessionSettings.from_env("DRAFT"), BatchSettings.from_env("DRAFT"),
                    _verifier_client(args.verifier_address, settings), facts.eos_token_ids,
                    PromptBuilder.from_pretrained(args.target, facts).decode)
    logging.getLogger("speculum.draft").info("ready port=%d", running.port)
    run_until_signal(running, settings.grace_s)


if __name__ == "__main__":
    main()
