"""The draft service: a thin gRPC servicer over a Drafter; streams each block in pieces, or, with a
batch window (SPECULUM_DRAFT_BATCH_WINDOW_MS), drafts concurrent sessions' rounds together.

Sessions are evicted (LRU) when the store is full: losing a draft session only costs speed, the
orchestrator then decodes with the target alone.
"""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path

from draft_service.batching import DraftBatcher, batchable
from orchestrator.protocols import DraftSession, Drafter
from speculum.metrics import SessionCollector, batch_collector
from speculum.errors import Unavailable
from speculum.rpc import convert
from speculum.rpc.server import RunningServer, run_until_signal, start_server
from speculum.rpc.settings import BatchSettings, ServerSettings, SessionSettings
from speculum.rpc.status import mapped
from speculum.sessions import SessionStore
from speculum.telemetry import setup_tracing, tracer
from speculum.v1 import drafter_pb2, drafter_pb2_grpc
from speculum.v1.session_pb2 import ReleaseResponse

SERVICE_NAME = "speculum.v1.Drafter"
DEFAULT_PORT = 50063


class DrafterServicer(drafter_pb2_grpc.DrafterServicer):
    def __init__(self, drafter: Drafter, sessions: SessionSettings, batch: BatchSettings = BatchSettings()):
        self.drafter = drafter
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
        session = self.drafter.open(convert.session_sampling_from_proto(request.sampling))
        with self._device:
            session.prefill(convert.prompt_from_proto(request.prompt), convert.result_from_proto(request.first))
        if not context.is_active():  # the caller gave up waiting (deadline): nobody would release it
            session.close()
            raise Unavailable("the caller is gone")
        self.sessions.open(request.session_id, session)
        return drafter_pb2.DrafterPrefillResponse()

    @mapped
    def Draft(self, request, context):
        yield from self._round(request)

    @mapped
    def DraftRounds(self, request_iterator, context):
        for request in request_iterator:
            drafted = 0
            for piece in self._round(request):
                drafted += len(piece.tokens)
                # A piece that fills the round ends it too: one message fewer per round (a drafter
                # never drafts past max_tokens, and a tree comes as one piece).
                last = drafted >= request.max_tokens
                yield drafter_pb2.DraftPiece(block=piece, end_of_round=last)
                if last:
                    break
            else:
                yield drafter_pb2.DraftPiece(end_of_round=True)

    def _round(self, request):
        """Commit the request's `advance`, then the pieces of the next block as protos."""
        with self.sessions.use(request.session_id) as session:
            if request.HasField("advance"):
                session.advance(convert.result_from_proto(request.advance))
            # a look-ahead (assume) drafts alone: a feature session covers several outcomes then
            if self.batcher is not None and batchable(session) and not request.assume:
                with tracer().start_as_current_span("speculum.drafter.propose") as span:
                    blocks = self.batcher.draft(session, request.max_tokens, tuple(request.assume))
                    span.set_attribute("speculum.draft_tokens", sum(len(b.tokens) for b in blocks))
                for block in blocks:
                    yield convert.block_to_proto(block)
                return
            pieces = session.propose(request.max_tokens, tuple(request.assume))
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
                    yield convert.block_to_proto(piece)

    @mapped
    def Release(self, request, context):
        return ReleaseResponse(released=self.sessions.release(request.session_id))


def serve(drafter: Drafter, settings: ServerSettings, sessions: SessionSettings,
          batch: BatchSettings = BatchSettings()) -> RunningServer:
    servicer = DrafterServicer(drafter, sessions, batch)
    running = start_server(
        settings,
        [lambda server: drafter_pb2_grpc.add_DrafterServicer_to_server(servicer, server)],
        [SERVICE_NAME],
        servicer,
        collectors=[SessionCollector(servicer.sessions),
                    batch_collector(lambda: servicer.batcher and servicer.batcher.stats, "draft")],
    )
    return running


def main(argv: list[str] | None = None) -> None:
    from draft_service.registry import load_drafter, target_vocab_size
    from speculum.logs import setup_logging
    from speculum.rpc.settings import tree_shape_from_env
    from speculum.threads import pin_from_env

    parser = argparse.ArgumentParser(description="Speculum draft service.")
    parser.add_argument("--target", type=Path, required=True, help="the target folder (vocabulary checks)")
    parser.add_argument("--drafter", required=True, help="ngram | DIR")
    args = parser.parse_args(argv)
    setup_logging("draft")
    setup_tracing("drafter")  # before the server is built: instrumentation patches grpc.server
    pin_from_env("DRAFT")
    settings = ServerSettings.from_env("DRAFT", DEFAULT_PORT)
    drafter = load_drafter(args.drafter, target_vocab_size(args.target), tree_shape=tree_shape_from_env())
    if drafter is None:
        raise SystemExit("the draft service needs a drafter (ngram or a folder), not none")
    running = serve(drafter, settings, SessionSettings.from_env("DRAFT"), BatchSettings.from_env("DRAFT"))
    logging.getLogger("speculum.draft").info("ready port=%d", running.port)
    run_until_signal(running, settings.grace_s)


if __name__ == "__main__":
    main()
