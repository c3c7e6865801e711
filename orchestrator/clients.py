"""gRPC clients of the verify, draft and vision-encoder services, implementing the loop's protocols.

Each session gets a fresh id; `close` releases it on the service (best effort: a session the
service already dropped is fine). RPC failures surface as typed core errors. Each call runs in a
span (encode, prefill, one per draft and verify round) under the caller's current context, which
the instrumented channel carries to the service.

Each draft round has its own deadline (a stalled drafter costs one deadline, then the loop skips
it), and a circuit breaker shared by all requests stops calling a drafter that keeps failing until
its pause is over. Channels use TLS when the settings name a CA.
"""

from __future__ import annotations

import logging
import queue
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc

from orchestrator.breaker import BreakerSettings, CircuitBreaker
from orchestrator.draft_stream import DraftRoundStream
from speculum.config import SamplingParams
from speculum.errors import Unavailable
from speculum.records import DraftBlock, PromptInputs, VerifyResult, join_results
from speculum.rpc import convert
from speculum.rpc.settings import ClientSettings, message_options
from speculum.rpc.status import error_from_rpc
from speculum.telemetry import tracer
from speculum.v1 import (
    drafter_pb2,
    drafter_pb2_grpc,
    session_pb2,
    verifier_pb2,
    verifier_pb2_grpc,
    vision_pb2,
    vision_pb2_grpc,
)
from vision_encoder.convert import encoded_from_proto
from vision_encoder.encoder import EncodedImage

log = logging.getLogger("speculum.clients")
_END_ROUNDS = object()  # ends a VerifyRounds request stream


def connect(address: str, settings: ClientSettings = ClientSettings(),
            max_message_bytes: int = 64 * 1024 * 1024) -> grpc.Channel:
    """A channel to an internal service: TLS when `settings.tls_ca_path` is set, else plaintext."""
    options = [*message_options(max_message_bytes), *settings.channel_options()]
    if settings.tls_ca_path is None:
        return grpc.insecure_channel(address, options)
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(settings.tls_ca_path).read_bytes())
    return grpc.secure_channel(address, credentials, options)


def _release(stub, session_id: str, timeout_s: float) -> None:
    try:
        stub.Release(session_pb2.ReleaseRequest(session_id=session_id), timeout=timeout_s)
    except grpc.RpcError as exc:
        log.info("release of %s failed: %s", session_id, exc.code())


class _VerifyRoundStream:
    """One session's VerifyRounds stream, opened on the first round: a round writes its request and
    reads its result in the caller's thread (no reader thread: a round has no deadline of its own)."""

    def __init__(self, stub: verifier_pb2_grpc.VerifierStub):
        self._stub = stub
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._call = None

    def round(self, request: verifier_pb2.VerifyRequest) -> session_pb2.VerifyResult:
        if self._call is None:
            self._call = self._stub.VerifyRounds(iter(self._outbox.get, _END_ROUNDS))
        self._outbox.put(request)
        result = next(self._call, None)
        if result is None:
            raise Unavailable("the verifier ended the session's stream")
        return result

    def close(self) -> None:
        if self._call is not None:
            self._outbox.put(_END_ROUNDS)


class GrpcVerifySession:
    """`rounds_stream`: rounds over one VerifyRounds stream, else one Verify call each."""

    def __init__(self, stub: verifier_pb2_grpc.VerifierStub, sampling: SamplingParams, return_hidden: bool,
                 timeout_s: float, rounds_stream: bool = False):
        self._stub = stub
        self._sampling = sampling
        self._return_hidden = return_hidden
        self._timeout_s = timeout_s
        self.session_id = f"v-{uuid.uuid4().hex}"
        self._open = False
        self._stream = _VerifyRoundStream(stub) if rounds_stream else None

    def prefill(self, prompt: PromptInputs) -> VerifyResult:
        request = verifier_pb2.VerifierPrefillRequest(
            session_id=self.session_id,
            # the target needs either embeddings or pixels, never both
            prompt=convert.prompt_to_proto(prompt, with_pixels=prompt.visual_embeds is None),
            sampling=convert.session_sampling_to_proto(self._sampling),
            return_hidden=self._return_hidden,
        )
        self._open = True
        with tracer().start_as_current_span("speculum.verify.prefill") as span:
            span.set_attribute("speculum.images", prompt.num_images)
            try:
                return convert.result_from_proto(self._stub.Prefill(request, timeout=self._timeout_s))
            except grpc.RpcError as exc:
                raise error_from_rpc(exc) from exc

    def verify(self, block: DraftBlock) -> VerifyResult:
        request = verifier_pb2.VerifyRequest(session_id=self.session_id, block=convert.block_to_proto(block))
        with tracer().start_as_current_span("speculum.verify.round") as span:
            span.set_attribute("speculum.draft_tokens", len(block.tokens))
            try:
                if self._stream is not None:
                    result = convert.result_from_proto(self._stream.round(request))
                else:
                    result = convert.result_from_proto(self._stub.Verify(request, timeout=self._timeout_s))
            except grpc.RpcError as exc:
                raise error_from_rpc(exc) from exc
            span.set_attributes(
                {"speculum.accepted_tokens": result.num_accepted, "speculum.emitted_tokens": len(result.tokens)}
            )
            return result

    def close(self) -> None:
        if self._open:
            self._open = False
            if self._stream is not None:
                self._stream.close()
            _release(self._stub, self.session_id, self._timeout_s)


class GrpcVerifier:
    """The Verifier protocol over a verify service. timeout_s: deadline of a prefill, a Verify call
    and a release; rounds_stream: each session's rounds go over one VerifyRounds stream (no call set-up
    per round; a round then has no deadline of its own)."""

    def __init__(self, channel: grpc.Channel, timeout_s: float = 60.0, rounds_stream: bool = False):
        self._stub = verifier_pb2_grpc.VerifierStub(channel)
        self.timeout_s = timeout_s
        self.rounds_stream = rounds_stream

    def open(self, sampling: SamplingParams, return_features: bool = False) -> GrpcVerifySession:
        return GrpcVerifySession(self._stub, sampling, return_features, self.timeout_s, self.rounds_stream)


class GrpcDraftSession:
    """Rounds over one DraftRounds stream; `advance` is folded into the next round's request, so a
    round costs one message each way."""

    def __init__(self, stub: drafter_pb2_grpc.DrafterStub, sampling: SamplingParams, timeout_s: float,
                 round_deadline_s: float, breaker: CircuitBreaker):
        self._stub = stub
        self._sampling = sampling
        self._timeout_s = timeout_s
        self._round_deadline_s = round_deadline_s
        self._breaker = breaker
        self.session_id = f"d-{uuid.uuid4().hex}"
        self._open = False
        self._unsent: VerifyResult | None = None
        self._stream = DraftRoundStream(stub)

    def prefill(self, prompt: PromptInputs, first: VerifyResult) -> None:
        request = drafter_pb2.DrafterPrefillRequest(
            session_id=self.session_id,
            # a feature drafter reads latents (compressed by the encoder) or else the visual embeds
            prompt=convert.prompt_to_proto(prompt, with_embeds=prompt.drafter_latents is None),
            sampling=convert.session_sampling_to_proto(self._sampling),
            first=convert.result_to_proto(first, with_hidden=first.hidden is not None),
        )
        self._open = True
        with tracer().start_as_current_span("speculum.draft.prefill"):
            try:
                self._stub.Prefill(request, timeout=self._timeout_s)
            except grpc.RpcError as exc:
                raise self._fault(exc) from exc
        self._breaker.succeeded()

    def propose(self, max_tokens: int, assume: Sequence[int] = ()) -> Iterator[DraftBlock]:
        request = drafter_pb2.DraftRequest(session_id=self.session_id, max_tokens=max_tokens, assume=assume)
        if self._unsent is not None:
            request.advance.CopyFrom(convert.result_to_proto(self._unsent, with_hidden=self._unsent.hidden is not None))
        self._unsent = None
        # Current across the yields: the instrumented stream starts its RPC span on the first read.
        # The loop drains a round in one go on one thread, so the context is detached where attached.
        with tracer().start_as_current_span("speculum.draft.round") as span:
            drafted = 0
            span.set_attributes({"speculum.max_tokens": max_tokens, "speculum.draft_tokens": drafted})
            try:
                for piece in self._stream.round(request, self._round_deadline_s):
                    block = convert.block_from_proto(piece)
                    drafted += len(block.tokens)
                    span.set_attribute("speculum.draft_tokens", drafted)
                    yield block
            except grpc.RpcError as exc:
                raise self._fault(exc) from exc
            except Unavailable:  # past the round's deadline, or the stream is gone
                self._breaker.failed()
                raise

    def _fault(self, exc: grpc.RpcError):
        """The typed error; a drafter that is down or too slow also opens the breaker (an
        evicted session is not the drafter's fault)."""
        error = error_from_rpc(exc)
        if isinstance(error, Unavailable):
            self._breaker.failed()
        return error

    def advance(self, result: VerifyResult) -> None:
        # Rounds without a draft call (K = 0 under load) must not lose what they committed.
        self._unsent = result if self._unsent is None else join_results(self._unsent, result)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._stream.close()
            _release(self._stub, self.session_id, self._timeout_s)


class GrpcDrafter:
    """The Drafter protocol over a draft service.

    timeout_s: deadline of a prefill (and release). round_deadline_s: deadline of one Draft round.
    While the breaker is open, `open` fails at once and the request decodes without drafts.
    """

    def __init__(self, channel: grpc.Channel, timeout_s: float = 10.0, round_deadline_s: float = 1.0,
                 breaker: BreakerSettings = BreakerSettings()):
        self._stub = drafter_pb2_grpc.DrafterStub(channel)
        self.timeout_s = timeout_s
        self.round_deadline_s = round_deadline_s
        self.breaker = CircuitBreaker(breaker)
        self._info: drafter_pb2.DrafterInfo | None = None

    @property
    def needs_target_features(self) -> bool:
        """Asked once; an unreachable drafter needs nothing (requests then decode without it)."""
        if self._info is None:
            try:
                self._info = self._stub.Info(drafter_pb2.DrafterInfoRequest(), timeout=self.timeout_s)
            except grpc.RpcError as exc:
                log.warning("drafter info unavailable (%s); asking again on the next request", exc.code())
                return False
        return self._info.needs_target_features

    def open(self, sampling: SamplingParams) -> GrpcDraftSession:
        if not self.breaker.allow():
            raise Unavailable("drafter: pausing after faults; decoding without drafts")
        return GrpcDraftSession(self._stub, sampling, self.timeout_s, self.round_deadline_s, self.breaker)


class GrpcImageEncoder:
    """The ImageEncoder protocol over a vision-encoder service."""

    def __init__(self, channel: grpc.Channel, timeout_s: float = 30.0):
        self._stub = vision_pb2_grpc.VisionEncoderStub(channel)
        self.timeout_s = timeout_s

    def encode(self, images: Sequence[bytes]) -> list[EncodedImage]:
        with tracer().start_as_current_span("speculum.encode") as span:
            span.set_attribute("speculum.images", len(images))
            try:
                response = self._stub.Encode(vision_pb2.EncodeRequest(images=list(images)), timeout=self.timeout_s)
            except grpc.RpcError as exc:
                raise error_from_rpc(exc) from exc
            encoded = [encoded_from_proto(message, i) for i, message in enumerate(response.images)]
            span.set_attribute("speculum.cache_hits", sum(image.cache_hit for image in encoded))
            return encoded
