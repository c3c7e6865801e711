"""The public `speculum.v1.Speculum` messages <-> the engine's request and chunk dataclasses."""

from __future__ import annotations

from orchestrator.engine import GenerateRequest
from orchestrator.loop import Chunk
from orchestrator.stopping import FinishReason
from speculum.config import SamplingParams, SpeculationParams
from speculum.v1 import common_pb2, speculum_pb2

DEFAULT_MAX_NEW_TOKENS = 256
FINISH = {
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: common_pb2.FINISH_REASON_EOS,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
}


def _field(message, name: str, default):
    return getattr(message, name) if message.HasField(name) else default


# Behind the public API the drafter has a device of its own, yet at the default K = 8 sequential rounds
# are the faster mode there too (the feature drafter's look-ahead branches only for blocks of at most
# its k = 4 tokens; README, "Defaults"). A request may still choose.
PIPELINED_BEHIND_API = False


def request_from_proto(message: speculum_pb2.GenerateRequest) -> GenerateRequest:
    """Unset optional fields take the defaults; set ones are validated by the dataclasses."""
    sampling, speculation = message.sampling, message.speculation
    defaults = SamplingParams()
    return GenerateRequest(
        prompt=message.prompt,
        images=list(message.images),
        sampling=SamplingParams(
            max_new_tokens=_field(sampling, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
            temperature=_field(sampling, "temperature", defaults.temperature),
            top_p=_field(sampling, "top_p", defaults.top_p),
            top_k=_field(sampling, "top_k", defaults.top_k),
            seed=_field(sampling, "seed", None),
            stop=tuple(sampling.stop),
        ),
        speculation=SpeculationParams(
            enabled=_field(speculation, "enabled", True),
            num_draft_tokens=_field(speculation, "num_draft_tokens", SpeculationParams().num_draft_tokens),
            pipelined=_field(speculation, "pipelined", PIPELINED_BEHIND_API),
            adaptive=_field(speculation, "adaptive", SpeculationParams().adaptive),
        ),
    )


def chunk_to_proto(chunk: Chunk, text: str, request_id: str, prompt_tokens: int,
                   completion_tokens: int) -> speculum_pb2.GenerateResponse:
    """One streamed message; the last one (chunk.finish set) carries the request's totals."""
    response = speculum_pb2.GenerateResponse(text=text, token_ids=chunk.token_ids, request_id=request_id)
    if chunk.finish is not None:
        stats = chunk.stats
        response.finish_reason = FINISH[chunk.finish]
        response.usage.prompt_tokens = prompt_tokens
        response.usage.completion_tokens = completion_tokens
        response.speculation.target_forwards = stats.target_forwards
        response.speculation.draft_tokens = stats.draft_tokens
        response.speculation.accepted_tokens = stats.accepted_tokens
        response.speculation.mean_accepted_length = stats.mean_accepted_length
        response.speculation.drafted_ahead = stats.drafted_ahead
        response.timing.ttft_s = stats.ttft_s
        response.timing.decode_s = stats.decode_s
    return response


def request_to_proto(request: GenerateRequest) -> speculum_pb2.GenerateRequest:
    """For clients (`speculum generate --server`, the demo, benchmarks)."""
    sampling = request.sampling
    message = speculum_pb2.GenerateRequest(prompt=request.prompt, images=list(request.images))
    message.sampling.max_new_tokens = sampling.max_new_tokens
    message.sampling.temperature = sampling.temperature
    message.sampling.top_p = sampling.top_p
    message.sampling.top_k = sampling.top_k
    if sampling.seed is not None:
        message.sampling.seed = sampling.seed
    message.sampling.stop.extend(sampling.stop)
    message.speculation.enabled = request.speculation.enabled
    message.speculation.num_draft_tokens = request.speculation.num_draft_tokens
    if request.speculation.pipelined is not None:  # unset: the server's faster mode
        message.speculation.pipelined = request.speculation.pipelined
    message.speculation.adaptive = request.speculation.adaptive
    return message


def response_json(response: speculum_pb2.GenerateResponse) -> dict:
    """The CLI's --json object from a final (unary) response: the same fields as in-process."""
    finish = {value: key.value for key, value in FINISH.items()}
    return {
        "text": response.text,
        "token_ids": list(response.token_ids),
        "finish_reason": finish.get(response.finish_reason, "unspecified"),
        "usage": {"prompt_tokens": response.usage.prompt_tokens, "completion_tokens": response.usage.completion_tokens},
        "speculation": {
            "target_forwards": response.speculation.target_forwards,
            "draft_tokens": response.speculation.draft_tokens,
            "accepted_tokens": response.speculation.accepted_tokens,
            "mean_accepted_length": round(response.speculation.mean_accepted_length, 4),
            "drafted_ahead": response.speculation.drafted_ahead,
        },
        "timing": {"ttft_s": round(response.timing.ttft_s, 6), "decode_s": round(response.timing.decode_s, 6)},
    }
