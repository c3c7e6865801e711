"""Protobuf messages <-> core dataclasses. The only place that knows both shapes."""

from __future__ import annotations

import torch

from speculum import wire
from speculum.config import SamplingParams
from speculum.records import Branch, DraftBlock, PromptInputs, VerifyResult
from speculum.rejection import NextTokenKind
from speculum.v1 import common_pb2, session_pb2

KINDS = {
    NextTokenKind.BONUS: session_pb2.NEXT_TOKEN_KIND_BONUS,
    NextTokenKind.RECOVERED: session_pb2.NEXT_TOKEN_KIND_RECOVERED,
}
KINDS_BACK = {value: key for key, value in KINDS.items()}


def tensor_to_proto(tensor: torch.Tensor | None) -> common_pb2.Tensor | None:
    if tensor is None:
        return None
    raw = wire.encode(tensor)
    return common_pb2.Tensor(dtype=raw.dtype, shape=raw.shape, data=raw.data)


def tensor_from_proto(message: common_pb2.Tensor, field: str) -> torch.Tensor | None:
    """None for an unset (empty) tensor message."""
    if not message.dtype:
        return None
    return wire.decode(wire.RawTensor(message.dtype, tuple(message.shape), message.data), field)


def _maybe(parent, name: str, field: str) -> torch.Tensor | None:
    return tensor_from_proto(getattr(parent, name), field) if parent.HasField(name) else None


# --- sessions -------------------------------------------------------------------------------------
def session_sampling_to_proto(sampling: SamplingParams) -> session_pb2.SessionSampling:
    assert sampling.seed is not None, "sessions take a resolved seed"
    return session_pb2.SessionSampling(
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        seed=sampling.seed,
    )


def session_sampling_from_proto(message: session_pb2.SessionSampling) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=message.max_new_tokens,
        temperature=message.temperature,
        top_p=message.top_p,
        top_k=message.top_k,
        seed=message.seed,
    )


def prompt_to_proto(prompt: PromptInputs, with_pixels: bool = True, with_embeds: bool = True) -> session_pb2.PromptInputs:
    return session_pb2.PromptInputs(
        token_ids=prompt.token_ids,
        pixel_values=tensor_to_proto(prompt.pixel_values) if with_pixels else None,
        visual_embeds=tensor_to_proto(prompt.visual_embeds) if with_embeds else None,
        drafter_latents=tensor_to_proto(prompt.drafter_latents),
    )


def prompt_from_proto(message: session_pb2.PromptInputs) -> PromptInputs:
    return PromptInputs(
        tuple(message.token_ids),
        pixel_values=_maybe(message, "pixel_values", "prompt.pixel_values"),
        visual_embeds=_maybe(message, "visual_embeds", "prompt.visual_embeds"),
        drafter_latents=_maybe(message, "drafter_latents", "prompt.drafter_latents"),
    )


def block_to_proto(block: DraftBlock) -> session_pb2.DraftBlock:
    return session_pb2.DraftBlock(
        tokens=block.tokens, draft_probs=tensor_to_proto(block.draft_probs), parents=block.parents or (),
        branches=[session_pb2.DraftBranch(accepted=b.accepted, token=b.token, block=block_to_proto(b.block))
                  for b in block.branches],
    )


def block_from_proto(message: session_pb2.DraftBlock) -> DraftBlock:
    return DraftBlock(
        tuple(message.tokens),
        draft_probs=_maybe(message, "draft_probs", "block.draft_probs"),
        parents=tuple(message.parents) or None,
        branches=tuple(Branch(b.accepted, b.token, block_from_proto(b.block)) for b in message.branches),
    )


def result_to_proto(result: VerifyResult, with_hidden: bool) -> session_pb2.VerifyResult:
    return session_pb2.VerifyResult(
        num_accepted=result.num_accepted,
        tokens=result.tokens,
        next_kind=KINDS[result.next_kind],
        hidden=tensor_to_proto(result.hidden) if with_hidden else None,
        queue_depth=result.queue_depth,
    )


def result_from_proto(message: session_pb2.VerifyResult) -> VerifyResult:
    return VerifyResult(
        message.num_accepted,
        tuple(message.tokens),
        KINDS_BACK[message.next_kind],
        _maybe(message, "hidden", "result.hidden"),
        message.queue_depth,
    )
