"""Requests whose loop runs beside the target (`Verifier.Generate`) or beside the drafter
(`Drafter.Generate`); see orchestrator.hosting.

The orchestrator sends the prepared prompt once and relays the chunks. When the host loses the
stream (restarted, drained: UNAVAILABLE or NOT_FOUND), the request goes on from what it emitted:
the prompt followed by the emitted tokens is prefilled, so the next token is the one the lost
stream would have produced (greedy output unchanged; a sampled request continues with a seed
derived for the new stream, so it stays an exact sample). A verifier is waited for on fresh
streams, for a bounded time (nothing can decode without it); a drafter is not: the rest of the
request runs in the orchestrator's own loop (`fallback`), so a dead drafter only costs speed.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from orchestrator.loop import RESUME_WITHIN_S, Chunk, ChunkStream, fresh_seed
from orchestrator.public_api import FINISH
from speculum.config import SamplingParams, SpeculationParams
from speculum.errors import Unavailable
from speculum.records import PromptInputs
from speculum.rpc import convert
from speculum.rpc.status import error_from_rpc
from speculum.stats import SpecStats
from speculum.v1 import drafter_pb2_grpc, verifier_pb2, verifier_pb2_grpc

if TYPE_CHECKING:
    from orchestrator.hosting import HostedLoops

log = logging.getLogger("speculum.remote_loop")

FINISH_BACK = {value: key for key, value in FINISH.items()}
COUNTS = ("target_forwards", "draft_tokens", "accepted_tokens", "emitted_tokens", "drafted_ahead")
RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)


class LoopPlacement(enum.Enum):
    """Where a request's loop runs: beside the target (a round is one message each way to the
    drafter, and the target is a local call), beside the drafter (a round is one Verify call, and a
    pipelined look-ahead needs no message) or in the orchestrator (two calls per round)."""

    VERIFIER = "verifier"
    DRAFTER = "drafter"
    ORCHESTRATOR = "orchestrator"


# Beside the target. Beside the drafter measured the same within this VM's noise (bench.services,
# alternating runs: 0.79 / 0.81 against 0.78 / 0.77; README, "Loops beside the drafter"), and there a
# killed drafter leaves its loops' verifier sessions to the verifier's TTL.
DEFAULT_LOOP_AT = LoopPlacement.VERIFIER


@dataclass(frozen=True)
class LoopRequest:
    """One stream's work. prompt: followed by `emitted` on a resumed stream; sampling: resolved seed,
    max_new_tokens left after `emitted`, stop strings; emitted: what the request emitted before this
    stream; final_only: send the whole answer as one chunk at the end (nobody reads it round by round)."""

    prompt: PromptInputs
    sampling: SamplingParams
    speculation: SpeculationParams
    emitted: tuple[int, ...] = ()
    final_only: bool = False


# --- wire -----------------------------------------------------------------------------------------
def loop_request_to_proto(request: LoopRequest) -> verifier_pb2.LoopRequest:
    message = verifier_pb2.LoopRequest(
        # Pixels too: the target reads the embeddings, but a drafter that is a small VLM reads pixels.
        prompt=convert.prompt_to_proto(request.prompt),
        sampling=convert.session_sampling_to_proto(request.sampling),
        stop=request.sampling.stop,
        emitted=request.emitted,
        final_only=request.final_only,
    )
    speculation = request.speculation
    message.speculation.enabled = speculation.enabled
    message.speculation.num_draft_tokens = speculation.num_draft_tokens
    if speculation.pipelined is not None:
        message.speculation.pipelined = speculation.pipelined
    message.speculation.adaptive = speculation.adaptive
    return message


def loop_request_from_proto(message: verifier_pb2.LoopRequest) -> LoopRequest:
    sampling = dataclasses.replace(convert.session_sampling_from_proto(message.sampling), stop=tuple(message.stop))
    defaults, given = SpeculationParams(), message.speculation
    speculation = SpeculationParams(
        enabled=given.enabled if given.HasField("enabled") else defaults.enabled,
        num_draft_tokens=given.num_draft_tokens if given.HasField("num_draft_tokens") else defaults.num_draft_tokens,
        pipelined=given.pipelined if given.HasField("pipelined") else defaults.pipelined,
        adaptive=given.adaptive if given.HasField("adaptive") else defaults.adaptive,
    )
    return LoopRequest(convert.prompt_from_proto(message.prompt), sampling, speculation, tuple(message.emitted),
                       message.final_only)


def loop_chunk_to_proto(chunk: Chunk) -> verifier_pb2.LoopChunk:
    message = verifier_pb2.LoopChunk(token_ids=chunk.token_ids)
    if chunk.finish is not None:
        message.finish_reason = FINISH[chunk.finish]
    for name in (*COUNTS, "ttft_s", "decode_s"):
        setattr(message.stats, name, getattr(chunk.stats, name))
    return message


def _counts(message: verifier_pb2.LoopChunk) -> SpecStats:
    return SpecStats(**{name: getattr(message.stats, name) for name in COUNTS})


def _add(total: SpecStats, more: SpecStats) -> SpecStats:
    return dataclasses.replace(total, **{name: getattr(total, name) + getattr(more, name) for name in COUNTS})


class _CurrentCall:
    """The request's stream in flight, cancellable from another thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._call = None
        self.cancelled = False

    def start(self, open_call):
        """The new call, or None once cancelled."""
        with self._lock:
            if self.cancelled:
                return None
            self._call = open_call()
            return self._call

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._call is not None:
                self._call.cancel()


def _drain(call) -> None:
    try:
        for _ in call:
            pass
    except grpc.RpcError as exc:
        log.info("the verifier ended a finished stream with %s", exc.code().name)


# --- the client -----------------------------------------------------------------------------------
class GrpcLoopHost:
    """Runs each request's loop on a verify service (default) or a draft service, relaying its chunks.

    fallback: where the rest of a request runs when the host loses its stream (a HostedLoops here,
    over clients of both services); None: fresh streams on the host, for `resume_within_s`."""

    def __init__(self, channel: grpc.Channel, resume_within_s: float = RESUME_WITHIN_S,
                 at: LoopPlacement = LoopPlacement.VERIFIER, fallback: HostedLoops | None = None):
        stub = verifier_pb2_grpc.VerifierStub if at is LoopPlacement.VERIFIER else drafter_pb2_grpc.DrafterStub
        self._generate = stub(channel).Generate
        self.at = at
        self.resume_within_s = resume_within_s
        self.fallback = fallback

    def stream(self, prompt: PromptInputs, sampling: SamplingParams, speculation: SpeculationParams,
               started: float, each_round: bool = True) -> ChunkStream:
        """The request's chunks, as `orchestrator.loop.speculate` yields them (timing as this side saw
        it); without `each_round`, one chunk with the whole answer (a lost stream then starts over).
        Its `cancel` ends the host's stream at once, even while a chunk is awaited."""
        current = _CurrentCall()
        return ChunkStream(self._chunks(prompt, sampling, speculation, started, each_round, current), current.cancel)

    def _chunks(self, prompt: PromptInputs, sampling: SamplingParams, speculation: SpeculationParams,
                started: float, each_round: bool, current: _CurrentCall) -> Iterator[Chunk]:
        sampling = sampling.with_seed()
        emitted: list[int] = []
        done = SpecStats()  # counts of streams that ended early
        first_at: float | None = None
        streams = 0
        lost_at: float | None = None
        while True:
            request = self._request(prompt, sampling, speculation, emitted, streams, final_only=not each_round)
            # Started in the caller's context: the instrumented channel carries the request's trace.
            call_started = time.perf_counter()
            call = current.start(lambda: self._generate(loop_request_to_proto(request)))
            if call is None:  # cancelled
                return
            counts = SpecStats()
            finished = falling_back = False
            try:
                for message in call:
                    lost_at = None
                    counts = _counts(message)
                    tokens = tuple(message.token_ids)
                    emitted.extend(tokens)
                    if first_at is None:
                        first_at = time.perf_counter()
                    if message.finish_reason:
                        finished = True
                        stats = _add(done, counts)
                        if request.final_only:  # the first token came before this chunk: as the loop saw it
                            stats.ttft_s = call_started - started + message.stats.ttft_s
                            stats.decode_s = message.stats.decode_s
                        else:
                            stats.ttft_s = first_at - started
                            stats.decode_s = time.perf_counter() - first_at
                        yield Chunk(tokens, FINISH_BACK[message.finish_reason], stats)
                        return
                    yield Chunk(tokens, stats=_add(done, counts))
                raise Unavailable(f"the {self.at.value} ended the request's stream before it finished")
            except grpc.RpcError as exc:
                if current.cancelled:
                    return
                if exc.code() not in RESUMABLE:
                    raise error_from_rpc(exc) from exc
                falling_back = self.fallback is not None
                if falling_back:  # the rest runs here, once the finally clause cancelled the lost call
                    log.warning("the %s lost the request's stream (%s); going on here at %d tokens", self.at.value,
                                exc.code().name, len(emitted))
                else:
                    lost_at = lost_at or time.monotonic()
                    self._wait_to_resume(exc, lost_at, len(emitted), streams)
            finally:
                if finished:  # let the host end the stream itself (OK, sessions released there)
                    _drain(call)
                else:  # abandoned (client gone, deadline) or failed: cancelling frees both sessions
                    call.cancel()
            done = _add(done, counts)
            streams += 1
            if falling_back:
                yield from self._fall_back(prompt, sampling, speculation, emitted, streams, done, started, first_at,
                                           not each_round)
                return

    def _wait_to_resume(self, exc: grpc.RpcError, lost_at: float, emitted: int, streams: int) -> None:
        """Back off before a fresh stream on the host; Unavailable once it is gone for too long."""
        if time.monotonic() - lost_at > self.resume_within_s:
            raise Unavailable(f"{self.at.value}: not back within {self.resume_within_s:.0f} s: "
                              f"{exc.code().name}: {exc.details()}") from exc
        log.warning("the %s lost the request's stream (%s); resuming at %d tokens", self.at.value,
                    exc.code().name, emitted)
        time.sleep(min(0.1 * 2 ** min(streams, 3), 1.0) if streams else 0.0)

    def _fall_back(self, prompt: PromptInputs, sampling: SamplingParams, speculation: SpeculationParams,
                   emitted: list[int], streams: int, done: SpecStats, started: float, first_at: float | None,
                   final_only: bool) -> Iterator[Chunk]:
        """The rest of the request after `emitted`, from the fallback's loop (counts added to `done`)."""
        request = self._request(prompt, sampling, speculation, emitted, streams, final_only)
        for chunk in self.fallback.run(request):
            if first_at is None:
                first_at = time.perf_counter()
            stats = _add(done, chunk.stats)
            if chunk.finish is not None:
                stats.ttft_s = first_at - started
                stats.decode_s = time.perf_counter() - first_at
            yield Chunk(chunk.token_ids, chunk.finish, stats)

    @staticmethod
    def _request(prompt: PromptInputs, sampling: SamplingParams, speculation: SpeculationParams,
                 emitted: Sequence[int], streams: int, final_only: bool) -> LoopRequest:
        """The `streams`-th stream's work: the request itself, or its rest after `emitted`."""
        if not streams:
            return LoopRequest(prompt, sampling, speculation, final_only=final_only)
        resumed = dataclasses.replace(
            fresh_seed(sampling, streams), max_new_tokens=sampling.max_new_tokens - len(emitted)
        )
        through = dataclasses.replace(prompt, token_ids=prompt.token_ids + tuple(emitted))
        return LoopRequest(through, resumed, speculation, tuple(emitted), final_only)


class SpeculationRouted:
    """Loops of speculating requests on `speculating`, the others (speculation off: the target alone)
    on `plain`, beside the target, so that they pay no round trip to a drafter per token."""

    def __init__(self, speculating: GrpcLoopHost, plain: GrpcLoopHost):
        self.speculating = speculating
        self.plain = plain

    def stream(self, prompt: PromptInputs, sampling: SamplingParams, speculation: SpeculationParams,
               started: float, each_round: bool = True) -> ChunkStream:
        host = self.speculating if speculation.enabled else self.plain
        return host.stream(prompt, sampling, speculation, started, each_round)
