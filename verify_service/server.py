"""The verify service: a thin gRPC servicer over TargetSession, one KV cache per session.

Sessions are refused (RESOURCE_EXHAUSTED) rather than evicted when the store is full: evicting a
verifier session would lose a request. One model pass runs at a time (the device is the bottleneck);
with a batch window, concurrent sessions' blocks share one pass (verify_service.batching).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from orchestrator.clients import GrpcDrafter, connect
from orchestrator.hosting import HostedLoops, serve_stream
from orchestrator.metered import MeteredDrafter, MeteredVerifier
from orchestrator.prompting import PromptBuilder
from orchestrator.protocols import Drafter
from orchestrator.remote_loop import loop_chunk_to_proto, loop_request_from_proto
from speculum.config import SamplingParams
from speculum.metrics import RoundMetrics, SessionCollector, batch_collector, new_registry, prefix_cache_collector
from speculum.prefix_cache import PrefixCache
from speculum.rpc import convert
from speculum.rpc.server import RunningServer, run_until_signal, start_server
from speculum.records import DraftBlock, PromptInputs, VerifyResult
from speculum.rpc.settings import (
    BatchSettings,
    ClientSettings,
    ServerSettings,
    SessionSettings,
    prefix_cache_bytes_from_env,
)
from speculum.rpc.status import mapped
from speculum.sessions import SessionStore
from speculum.telemetry import setup_tracing, tracer
from speculum.v1 import verifier_pb2_grpc
from speculum.v1.session_pb2 import ReleaseResponse
from speculum.vlm import VisionLanguageModel
from verify_service.batching import VerifyBatcher
from verify_service.hosted import LocalVerifier
from verify_service.target import TargetSession

SERVICE_NAME = "speculum.v1.Verifier"
DRAFT_TIMEOUT_S = 5.0  # a hosted loop's draft prefill (and release); rounds have their own deadline
DEFAULT_PORT = 50062


@dataclass
class _Session:
    target: TargetSession
    return_hidden: bool


class VerifierServicer(verifier_pb2_grpc.VerifierServicer):
    """`loops` runs the requests' loops that Generate hosts here (set by `serve`)."""

    def __init__(self, model: VisionLanguageModel, sessions: SessionSettings, batch: BatchSettings = BatchSettings(),
                 prefixes: PrefixCache | None = None):
        self.model = model
        self.loops: HostedLoops | None = None
        self.prefixes = PrefixCache() if prefixes is None else prefixes
        self.sessions: SessionStore[_Session] = SessionStore(
            sessions.ttl_s, sessions.max_sessions, evict_when_full=False, close=lambda s: s.target.close()
        )
        self._device = threading.Lock()
        self.batcher = VerifyBatcher(batch, self._device, lambda: len(self.sessions)) if batch.window_s > 0 else None
        self._counting = threading.Lock()
        self.in_flight = 0  # Verify calls being served: the load each result reports

    @mapped
    def Prefill(self, request, context):
        sampling = convert.session_sampling_from_proto(request.sampling)
        result = self.prefill(request.session_id, sampling, request.return_hidden,
                              convert.prompt_from_proto(request.prompt))
        if not context.is_active():  # the caller gave up waiting (deadline): nobody would release it
            self.sessions.release(request.session_id)
        return convert.result_to_proto(result, request.return_hidden)

    @mapped
    def Verify(self, request, context):
        result, return_hidden = self.verify(request.session_id, convert.block_from_proto(request.block))
        return convert.result_to_proto(result, return_hidden)

    @mapped
    def VerifyRounds(self, request_iterator, context):
        for request in request_iterator:
            result, return_hidden = self.verify(request.session_id, convert.block_from_proto(request.block))
            yield convert.result_to_proto(result, return_hidden)

    @mapped
    def Generate(self, request, context):
        loop = loop_request_from_proto(request)
        yield from serve_stream(self.loops.run(loop), loop_chunk_to_proto, context, loop.final_only)

    def prefill(self, session_id: str, sampling: SamplingParams, return_hidden: bool,
                prompt: PromptInputs) -> VerifyResult:
        """Open session `session_id` and prefill it (the session is gone again if this fails)."""
        session = _Session(TargetSession(self.model, sampling, self.prefixes), return_hidden)
        self.sessions.open(session_id, session)
        try:
            with (
                self.sessions.use(session_id) as owned,
                self._device,
                tracer().start_as_current_span("speculum.target.prefill") as span,
            ):
                result = owned.target.prefill(prompt)
                span.set_attribute("speculum.reused_prefix_tokens", owned.target.reused_prefix)
        except BaseException:
            self.sessions.release(session_id)
            raise
        return result

    def verify(self, session_id: str, block: DraftBlock) -> tuple[VerifyResult, bool]:
        """Verify `block` in session `session_id` -> (the result with the queue depth it met, whether
        the session returns hidden states)."""
        with (
            self._arrival() as ahead,
            self.sessions.use(session_id) as owned,
            tracer().start_as_current_span("speculum.target.verify") as span,
        ):
            if self.batcher is not None:
                result = self.batcher.verify(owned.target, block)
            else:
                with self._device:
                    result = owned.target.verify(block)
            span.set_attributes(
                {"speculum.draft_tokens": len(block.tokens), "speculum.accepted_tokens": result.num_accepted}
            )
        return dataclasses.replace(result, queue_depth=ahead), owned.return_hidden

    @contextmanager
    def _arrival(self) -> Iterator[int]:
        """Count this Verify call in flight while it is served; yields the calls already in flight."""
        with self._counting:
            ahead = self.in_flight
            self.in_flight += 1
        try:
            yield ahead
        finally:
            with self._counting:
                self.in_flight -= 1

    @mapped
    def Release(self, request, context):
        return ReleaseResponse(released=self.sessions.release(request.session_id))


def serve(model: VisionLanguageModel, settings: ServerSettings, sessions: SessionSettings,
          batch: BatchSettings = BatchSettings(), prefixes: PrefixCache | None = None,
          drafter: Drafter | None = None, decode: Callable[[Sequence[int]], str] | None = None) -> RunningServer:
    """`drafter`: the draft service's client for the loops this verifier hosts (None: they decode with
    the target alone); `decode`: the target's detokenizer, for stop strings in those loops."""
    servicer = VerifierServicer(model, sessions, batch, prefixes)
    # A hosted loop holds a worker thread for its whole request: one more thread per session it may
    # hold. (Admission stays as configured: SPECULUM_MAX_CONCURRENT_RPCS counts each loop's stream.)
    settings = dataclasses.replace(settings, max_workers=settings.max_workers + sessions.max_sessions)
    registry = new_registry()
    rounds = RoundMetrics(registry)
    servicer.loops = HostedLoops(
        MeteredVerifier(LocalVerifier(servicer), rounds),
        None if drafter is None else MeteredDrafter(drafter, rounds),
        model.facts.eos_token_ids,
        decode,
    )
    running = start_server(
        settings,
        [lambda server: verifier_pb2_grpc.add_VerifierServicer_to_server(servicer, server)],
        [SERVICE_NAME],
        servicer,
        collectors=[SessionCollector(servicer.sessions), prefix_cache_collector(lambda: servicer.prefixes.stats),
                    batch_collector(lambda: servicer.batcher and servicer.batcher.stats, "verify")],
        registry=registry,
    )
    return running


def _drafter_client(address: str, settings: ServerSettings) -> Drafter | None:
    """The draft service's client as the orchestrator would build it (TLS, per-round deadline)."""
    if not address:
        return None
    clients = ClientSettings.from_env()
    return GrpcDrafter(connect(address, clients, settings.max_message_bytes), timeout_s=DRAFT_TIMEOUT_S,
                       round_deadline_s=clients.draft_round_deadline_s)


def main(argv: list[str] | None = None) -> None:
    from speculum.logs import setup_logging
    from speculum.threads import pin_from_env

    parser = argparse.ArgumentParser(description="Speculum verify service (the target model).")
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--drafter-address", default=os.environ.get("SPECULUM_DRAFT_ADDRESS", ""),
                        help="host:port of the draft service, for the loops this verifier hosts "
                             "(default $SPECULUM_DRAFT_ADDRESS; empty: they decode with the target alone)")
    args = parser.parse_args(argv)
    setup_logging("verify")
    setup_tracing("verifier")  # before the server is built: instrumentation patches grpc.server
    pin_from_env("VERIFY")
    settings = ServerSettings.from_env("VERIFY", DEFAULT_PORT)
    model = VisionLanguageModel.from_pretrained(args.target)
    running = serve(model, settings, SessionSettings.from_env("VERIFY"), BatchSettings.from_env("VERIFY"),
                    PrefixCache(prefix_cache_bytes_from_env()), _drafter_client(args.drafter_address, settings),
                    PromptBuilder.from_pretrained(args.target, model.facts).decode)
    logging.getLogger("speculum.verify").info("ready port=%d", running.port)
    run_until_signal(running, settings.grace_s)


if __name__ == "__main__":
    main()
