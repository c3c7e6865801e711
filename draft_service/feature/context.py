"""A target sequence and its features -> the drafter's context rows (one function for serving and training).

Both the draft session's prefill and the trainer build the context here, so what the drafter is
trained on is exactly what it sees when serving.
"""

from __future__ import annotations

import torch

from draft_service.feature.layout import DraftContext, build_context, slot_images
from draft_service.feature.model import FeatureDraftModel
from draft_service.feature.visual import direct_visual_rows
from speculum.errors import InvalidArgument
from speculum.model_facts import ModelFacts


def sequence_context(
    model: FeatureDraftModel,
    token_ids: torch.Tensor,
    hidden: torch.Tensor,
    slots: ModelFacts,
    prompt_length: int,
    visual_embeds: torch.Tensor | None = None,
    latents: torch.Tensor | None = None,
) -> DraftContext:
    """The drafter's context for an (expanded) sequence whose first L positions have target features.

    token_ids: [L + 1] x_0..x_L (x_L may be the pending token) · hidden: [L, D] h_0..h_{L-1} ·
    visual_embeds: [I, N, D] or None · latents: [I, C, D] from the vision encoder, or None.
    `slots` (the target's facts) says which ids are visual positions and how many per image; only
    the first `prompt_length` tokens can be (a generated image-token id is an ordinary token).
    """
    num_rows = hidden.shape[0]
    assert token_ids.shape == (num_rows + 1,) and hidden.dim() == 2, (token_ids.shape, hidden.shape)
    next_tokens = token_ids[1:]
    if slots.image_token_id is None:
        is_slot = torch.zeros(num_rows, dtype=torch.bool)
    else:
        is_slot = (next_tokens == slots.image_token_id) & (torch.arange(1, num_rows + 1) < prompt_length)
    if slots.image_token_id is not None and int(token_ids[0]) == slots.image_token_id:
        raise InvalidArgument("prompt", "the feature drafter needs a token before the first image")
    num_slots = int(is_slot.sum())
    if num_slots % max(1, slots.num_image_tokens):
        raise InvalidArgument("images", "the prompt ends inside an image")
    next_embeds = model.embed(next_tokens)
    if num_slots and visual_embeds is not None:
        if visual_embeds.shape[0] * visual_embeds.shape[1] != num_slots:
            raise InvalidArgument("images", f"{num_slots} image slots but visual embeds {list(visual_embeds.shape)}")
        next_embeds = next_embeds.clone()
        next_embeds[is_slot] = visual_embeds.reshape(-1, visual_embeds.shape[-1]).to(next_embeds.dtype)
    fused = model.fuse(next_embeds, hidden)
    if not num_slots:
        return build_context(fused, torch.full((num_rows,), -1), None)
    images = slot_images(is_slot, slots.num_image_tokens)
    # The hidden state AT each visual position is the row after the one whose next token is that slot.
    slot_rows = is_slot.nonzero().flatten() + 1
    slot_hidden = hidden[slot_rows].reshape(-1, slots.num_image_tokens, hidden.shape[-1])
    direct = direct_visual_rows(model, visual_embeds, slot_hidden, latents)
    if direct is None and visual_embeds is None:
        raise InvalidArgument("images", "the feature drafter needs the projected visual embeddings")
    return build_context(fused, images, direct)
