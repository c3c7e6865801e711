"""The verify service: a thin gRPC servicer over TargetSession, one KV cache per session.

Sessions are refused (RESOURCE_EXHAUSTED) rather than evicted when the store is full: evicting a
verifier session would lose a request. One model pass runs at a time (the device is the bottleneck);
with a batch window, concurrent sessions' blocks share one pass (verify_service.batching).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from speculum.metrics import SessionCollector, batch_collector, prefix_cache_collector
from speculum.prefix_cache import PrefixCache
from speculum.rpc import convert
from speculum.rpc.server import RunningServer, run_until_signal, start_server
from speculum.rpc.settings import BatchSettings, ServerSettings, SessionSettings, prefix_cache_bytes_from_env
from speculum.rpc.status import mapped
from speculum.sessions import SessionStore
from speculum.telemetry import setup_tracing, tracer
from speculum.v1 import verifier_pb2_grpc
from speculum.v1.session_pb2 import ReleaseResponse
from speculum.vlm import VisionLanguageModel
from verify_service.batching import VerifyBatcher
from verify_service.target import TargetSession

SERVICE_NAME = "speculum.v1.Verifier"
DEFAULT_PORT = 50062


@dataclass
class _Session:
    target: TargetSession
    return_hidden: bool


class VerifierServicer(verifier_pb2_grpc.VerifierServicer):
    def __init__(self, model: VisionLanguageModel, sessions: SessionSettings, batch: BatchSettings = BatchSettings(),
                 prefixes: PrefixCache | None = None):
        self.model = model
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
        session = _Session(TargetSession(self.model, sampling, self.prefixes), request.return_hidden)
        self.sessions.open(request.session_id, session)
        try:
            with (
                self.sessions.use(request.session_id) as owned,
                self._device,
                tracer().start_as_current_span("speculum.target.prefill") as span,
            ):
                result = owned.target.prefill(convert.prompt_from_proto(request.prompt))
                span.set_attribute("speculum.reused_prefix_tokens", owned.target.reused_prefix)
        except BaseException:
            self.sessions.release(request.session_id)
            raise
        if not context.is_active():  # the caller gave up waiting (deadline): nobody would release it
            self.sessions.release(request.session_id)
        return convert.result_to_proto(result, request.return_hidden)

    @mapped
    def Verify(self, request, context):
        block = convert.block_from_proto(request.block)
        with (
            self._arrival() as ahead,
            self.sessions.use(request.session_id) as owned,
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
        return convert.result_to_proto(dataclasses.replace(result, queue_depth=ahead), owned.return_hidden)

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
          batch: BatchSettings = BatchSettings(), prefixes: PrefixCache | None = None) -> RunningServer:
    servicer = VerifierServicer(model, sessions, batch, prefixes)
    running = start_server(
        settings,
        [lambda server: verifier_pb2_grpc.add_VerifierServicer_to_server(servicer, server)],
        [SERVICE_NAME],
        servicer,
        collectors=[SessionCollector(servicer.sessions), prefix_cache_collector(lambda: servicer.prefixes.stats),
                    batch_collector(lambda: servicer.batcher and servicer.batcher.stats, "verify")],
    )
    return running


def main(argv: list[str] | None = None) -> None:
    from speculum.logs import setup_logging
    from speculum.threads import pin_from_env

    parser = argparse.ArgumentParser(description="Speculum verify service (the target model).")
    parser.add_argument("--target", type=Path, required=True)
    args = parser.parse_args(argv)
    setup_logging("verify")
    setup_tracing("verifier")  # before the server is built: instrumentation patches grpc.server
    pin_from_env("VERIFY")
    settings = ServerSettings.from_env("VERIFY", DEFAULT_PORT)
    running = serve(VisionLanguageModel.from_pretrained(args.target), settings, SessionSettings.from_env("VERIFY"),
                    BatchSettings.from_env("VERIFY"), PrefixCache(prefix_cache_bytes_from_env()))
    logging.getLogger("speculum.verify").info("ready port=%d", running.port)
    run_until_signal(running, settings.grace_s)


if __name__ == "__main__":
    main()
