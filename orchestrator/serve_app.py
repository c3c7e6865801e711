"""The Ray Serve application behind the public gRPC API (`speculum.v1.Speculum`).

A replica holds no model: it tokenizes with the target's tokenizer, has the images encoded, then
relays the request's loop, which runs beside the target (`Verifier.Generate`) or beside the drafter
(`loop_at=DRAFTER`, `Drafter.Generate`), or, with `loop_at=ORCHESTRATOR`, runs here over gRPC
clients of the verify and draft services. Each is
blocking, so each request steps it in a worker thread; when Serve cancels the request (client gone,
deadline passed) the generator is closed, which releases the sessions in both services.

Each request runs in a `speculum.generate` span that continues the caller's trace: Serve's gRPC
proxy forwards the public call's metadata, `traceparent` included, in `grpc_context`. The worker
threads run under that span's context, so the clients' spans and RPCs join the same trace.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from orchestrator.clients import GrpcDrafter, GrpcImageEncoder, GrpcVerifier, connect
from orchestrator.engine import Engine
from orchestrator.loop import Chunk
from orchestrator.metered import MeteredDrafter, MeteredVerifier
from orchestrator.prompting import PromptBuilder
from orchestrator.public_api import chunk_to_proto, request_from_proto
from orchestrator.hosting import HostedLoops
from orchestrator.remote_loop import DEFAULT_LOOP_AT, GrpcLoopHost, LoopPlacement, SpeculationRouted
from speculum.errors import SpeculumError, Unauthenticated
from speculum.metrics import RoundMetrics, RpcMetrics, SpecMetrics, export, new_registry
from speculum.model_facts import ModelFacts
from speculum.rpc.settings import ClientSettings, MetricsSettings
from speculum.rpc.status import code_for
from speculum.telemetry import call_in_context, context_from_metadata, setup_tracing, tracer
from speculum.v1 import speculum_pb2

log = logging.getLogger("speculum.orchestrator")
SERVICER_FUNCTION = "speculum.v1.speculum_pb2_grpc.add_SpeculumServicer_to_server"
PUBLIC_SERVICE = speculum_pb2.DESCRIPTOR.services_by_name["Speculum"].full_name


@dataclass(frozen=True)
class OrchestratorConfig:
    """target_dir: the target folder (tokenizer, processor, config; weights are not loaded here).
    verify_address / draft_address / encoder_address: host:port of the services (draft None: no
        speculation; encoder None: the target encodes pixels itself, nothing is cached).
    max_message_bytes: gRPC message limit towards the services.
    verify_timeout_s / draft_timeout_s: per-RPC deadlines; a slow drafter is dropped, not waited for.
    max_concurrent: requests one replica steps at once (one thread each).
    max_queued: requests waiting for a replica beyond those; more are refused with RESOURCE_EXHAUSTED
        by Serve at once instead of queueing without bound.
    api_token: when set, every public call must carry `authorization: Bearer <token>` (off locally).
    clients: TLS towards the services and the per-round draft deadline.
    loop_at: where requests' loops run. VERIFIER (default): the verify service runs each loop and
        drafts with its own draft-service client (its SPECULUM_DRAFT_ADDRESS); `draft_address` is
        then unused here. DRAFTER: the draft service runs each loop with its verify-service client (its
        SPECULUM_VERIFY_ADDRESS); a request whose stream the drafter loses goes on here, over clients of
        both services; a request with speculation off runs beside the target (no drafter to talk to).
        ORCHESTRATOR: this replica runs them over clients of both services.
    metrics: the replica's Prometheus exporter (off by default; replica i on a node takes port + i)."""

    target_dir: str
    verify_address: str
    draft_address: str | None = None
    encoder_address: str | None = None
    max_message_bytes: int = 64 * 1024 * 1024
    verify_timeout_s: float = 60.0
    draft_timeout_s: float = 5.0
    max_concurrent: int = 16
    max_queued: int = 64
    api_token: str | None = None
    clients: ClientSettings = ClientSettings()
    metrics: MetricsSettings = MetricsSettings()
    loop_at: LoopPlacement = DEFAULT_LOOP_AT


class SpeculumApp:
    """The deployment class (wrapped by `serve.deployment` in `build`)."""

    def __init__(self, config: OrchestratorConfig):
        # Before the channels exist: the instrumentation wraps channel creation.
        self._tracing = setup_tracing("orchestrator")
        facts = ModelFacts.from_pretrained(config.target_dir)
        def channel(address: str) -> grpc.Channel:
            return connect(address, config.clients, config.max_message_bytes)

        encoder = None
        if config.encoder_address:
            encoder = GrpcImageEncoder(channel(config.encoder_address))
        prompts = PromptBuilder.from_pretrained(config.target_dir, facts)
        registry = new_registry()
        self._rpc_metrics = RpcMetrics(registry)
        self._spec_metrics = SpecMetrics(registry)
        self.metrics = export(registry, config.metrics, _replica_metrics_port(config.metrics))
        if config.loop_at is LoopPlacement.VERIFIER:
            host = GrpcLoopHost(channel(config.verify_address))
            self.engine = Engine(facts, prompts, None, None, encoder, loop_host=host)
        else:
            rounds = RoundMetrics(registry)
            verifier = MeteredVerifier(GrpcVerifier(channel(config.verify_address), config.verify_timeout_s), rounds)
            drafter = None
            if config.draft_address:
                drafter = MeteredDrafter(
                    GrpcDrafter(channel(config.draft_address), timeout_s=config.draft_timeout_s,
                                round_deadline_s=config.clients.draft_round_deadline_s),
                    rounds,
                )
            if config.loop_at is LoopPlacement.DRAFTER and config.draft_address:
                here = HostedLoops(verifier, drafter, facts.eos_token_ids, prompts.decode)
                host = SpeculationRouted(
                    GrpcLoopHost(channel(config.draft_address), at=LoopPlacement.DRAFTER, fallback=here),
                    GrpcLoopHost(channel(config.verify_address)),
                )
                self.engine = Engine(facts, prompts, None, None, encoder, loop_host=host)
            else:  # ORCHESTRATOR, or DRAFTER without a drafter: the target alone, here
                self.engine = Engine(facts, prompts, verifier, drafter, encoder)
        self._threads = ThreadPoolExecutor(max_workers=config.max_concurrent, thread_name_prefix="loop")
        self._api_token = config.api_token

    async def Generate(self, request: speculum_pb2.GenerateRequest, grpc_context=None) -> speculum_pb2.GenerateResponse:
        final = speculum_pb2.GenerateResponse()
        token_ids: list[int] = []
        text = ""
        async for response, text in self._metered("Generate", request, grpc_context, each_round=False):
            token_ids.extend(response.token_ids)
            final = response
        final.text = text
        del final.token_ids[:]
        final.token_ids.extend(token_ids)
        return final

    async def GenerateStream(self, request: speculum_pb2.GenerateRequest, grpc_context=None):
        async for response, _ in self._metered("GenerateStream", request, grpc_context):
            yield response
        # Ray Serve 2.60 applies a stream's context only along with a message: a status set after
        # the last message (or with none) would reach the client as OK. Raising carries it.
        if grpc_context is not None and grpc_context.code() not in (None, grpc.StatusCode.OK):
            raise StreamFailed(grpc_context.details())

    async def _metered(self, method: str, message, grpc_context, each_round: bool = True
                       ) -> AsyncIterator[tuple[speculum_pb2.GenerateResponse, str]]:
        """`_responses`, counted and timed under the call's final status code."""
        started = time.perf_counter()
        code = "UNKNOWN"
        try:
            async for item in self._responses(message, grpc_context, each_round):
                yield item
            code = _context_code(grpc_context)
        except SpeculumError as exc:  # raised only without a gRPC context (direct calls)
            code = code_for(exc).name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        finally:
            self._rpc_metrics.observe(PUBLIC_SERVICE, method, code, time.perf_counter() - started)

    async def _responses(self, message, grpc_context, each_round: bool
                         ) -> AsyncIterator[tuple[speculum_pb2.GenerateResponse, str]]:
        """Each round's message (its `text` a delta) with the whole visible text so far; without
        `each_round` (unary calls) one message for the whole answer, the loop stepped in one worker
        call (no thread hop, decode or proto per round), stopping at the next round if cancelled."""
        request_id = message.request_id or uuid.uuid4().hex
        span = _request_span(request_id, grpc_context) if self._tracing else trace.INVALID_SPAN
        in_span = trace.set_span_in_context(span)
        loop = asyncio.get_running_loop()
        try:
            authorize(self._api_token, grpc_context)
            prepared = await loop.run_in_executor(
                self._threads, call_in_context, in_span, self.engine.prepare, request_from_proto(message)
            )
        except SpeculumError as exc:
            self._fail(grpc_context, exc, span)
            span.end()
            return
        span.set_attributes(
            {
                "speculum.prompt_tokens": prepared.prompt_tokens,
                "speculum.images": len(prepared.request.images),
                "speculum.image_cache_hits": prepared.image_cache_hits,
            }
        )
        chunks = self.engine.stream(prepared, each_round)
        stepping = threading.Lock()  # a generator must not be advanced and closed at once
        cancelled = threading.Event()

        def step() -> list[Chunk]:
            """The next round's chunk (none when done), or with `each_round` off every chunk left."""
            settled: list[Chunk] = []
            with stepping:
                while not cancelled.is_set() and (chunk := call_in_context(in_span, next, chunks, None)) is not None:
                    settled.append(chunk)
                    if each_round or chunk.finish is not None:
                        break
            return settled

        def close():
            with stepping:
                call_in_context(in_span, chunks.close)

        token_ids: list[int] = []
        sent = ""
        try:
            while settled := await loop.run_in_executor(self._threads, step):
                chunk = Chunk(tuple(t for c in settled for t in c.token_ids), settled[-1].finish, settled[-1].stats)
                token_ids.extend(chunk.token_ids)
                text = prepared.stop.visible_text(self.engine.prompts.decode(token_ids), chunk.finish)
                # Hold back a trailing partial UTF-8 character until the next token completes it.
                stable = text if chunk.finish else text.rstrip("\ufffd")
                delta, sent = stable[len(sent):], stable
                response = chunk_to_proto(chunk, delta, request_id, prepared.prompt_tokens, len(token_ids))
                if chunk.finish is not None:
                    response.images.count = len(prepared.request.images)
                    response.images.cache_hits = prepared.image_cache_hits
                    self._spec_metrics.observe_images(len(prepared.request.images), prepared.image_cache_hits)
                    if chunk.stats is not None:
                        self._spec_metrics.observe_request(chunk.stats)
                    span.set_attributes(_finish_attributes(chunk, len(token_ids)))
                yield response, text
        except SpeculumError as exc:
            self._fail(grpc_context, exc, span)
        except (asyncio.CancelledError, GeneratorExit):
            cancelled.set()
            chunks.cancel()  # a loop running in the verifier stops now, even mid-chunk
            span.set_attribute("speculum.cancelled", True)
            raise
        finally:
            # On completion, error and cancellation alike: closing the loop releases both sessions.
            self._threads.submit(close)
            span.end()

    @staticmethod
    def _fail(grpc_context, exc: SpeculumError, span: Span) -> None:
        log.info("request failed: %s", exc)
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, str(exc)))
        if grpc_context is None:
            raise exc
        grpc_context.set_code(code_for(exc))
        grpc_context.set_details(str(exc))


class StreamFailed(Exception):
    """Carries the status already set on a stream's gRPC context through Serve's proxy."""


def authorize(api_token: str | None, grpc_context) -> None:
    """Check the bearer token when one is configured (constant-time comparison)."""
    if not api_token:
        return
    metadata = dict(grpc_context.invocation_metadata()) if grpc_context is not None else {}
    presented = metadata.get("authorization", "")
    if not hmac.compare_digest(presented.encode(), f"Bearer {api_token}".encode()):
        raise Unauthenticated("a valid `authorization: Bearer <token>` header is required")


def _context_code(grpc_context) -> str:
    """The status a finished call leaves with (`_fail` sets it on the context)."""
    code = grpc_context.code() if grpc_context is not None else None
    return "OK" if code is None else code.name


def _replica_metrics_port(settings: MetricsSettings) -> int | None:
    """Replica i on a node serves `settings.port + i`: replicas in one pod share its network.
    Only replica 0's port (9100) is in the pod's scrape annotation; see README "Operations"."""
    if not settings.port:
        return settings.port
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return settings.port + serve.get_replica_context().rank.local_rank
    except RayServeException:  # built outside Serve (tests construct the app directly)
        return settings.port


def _request_span(request_id: str, grpc_context) -> Span:
    """The request's span, a child of the caller's span when the call carried a trace context.
    Not made current here: the async generator may be resumed (or closed) in other contexts."""
    metadata = grpc_context.invocation_metadata() if grpc_context is not None else ()
    return tracer().start_span(
        "speculum.generate",
        context=context_from_metadata(metadata),
        kind=SpanKind.SERVER,
        attributes={"speculum.request_id": request_id},
    )


def _finish_attributes(chunk: Chunk, completion_tokens: int) -> dict[str, str | int | float]:
    """The last chunk's outcome and speculation stats (τ = mean_accepted_length, bonus included)."""
    attributes: dict[str, str | int | float] = {
        "speculum.completion_tokens": completion_tokens,
        "speculum.finish_reason": chunk.finish.value,
    }
    if chunk.stats is not None:
        attributes.update({f"speculum.{key}": value for key, value in chunk.stats.speculation_fields().items()})
    return attributes
