"""Where each row of the drafter's context comes from: fused text rows and direct visual rows.

Row j of the target's view pairs the target's hidden state h_j with the NEXT token's input
embedding e_{j+1} (EAGLE's shift): fc(e_{j+1}, h_j) is the input, h_{j+1} the feature to predict.
When x_{j+1} is an image slot, MSD replaces that row by the visual input itself, and FLASH replaces
each image's N rows by C latents. Pure tensor bookkeeping; no model weights here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NOT_TEXT = -1  # target_positions value of a direct visual row


@dataclass(frozen=True)
class DraftContext:
    """inputs: [T', D] the drafter's layer inputs · target_positions: [T'] the target position j of
    each fused row (its output predicts h_{j+1}), NOT_TEXT for direct visual rows."""

    inputs: torch.Tensor
    target_positions: torch.Tensor

    def __post_init__(self) -> None:
        assert self.inputs.dim() == 2 and self.target_positions.shape == self.inputs.shape[:1], (
            self.inputs.shape, self.target_positions.shape)


def slot_images(next_is_slot: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
    """Image index of each row whose next token is an image slot, else -1.

    next_is_slot: [T] bool. Slots come in runs of N per image (images may be adjacent), in order.
    """
    order = torch.cumsum(next_is_slot.long(), 0) - 1  # [T] slot ordinal at slot rows
    return torch.where(next_is_slot, torch.div(order, num_image_tokens, rounding_mode="floor"), -1)


def build_context(fused: torch.Tensor, images: torch.Tensor, direct_visual: torch.Tensor | None) -> DraftContext:
    """The drafter's context rows for one sequence.

    fused: [T, D] fc(e_{j+1}, h_j) for every row (visual rows included) · images: [T] image index
    of x_{j+1} or -1 · direct_visual: [I, n, D] rows that replace each image's visual rows (n = N
    for MSD decoupling, C for FLASH latents), or None to keep the fused rows (EAGLE / FLASH baseline).
    """
    assert fused.dim() == 2 and images.shape == fused.shape[:1], (fused.shape, images.shape)
    positions = torch.arange(fused.shape[0])
    if direct_visual is None:
        return DraftContext(fused, positions)
    num_images = int(images.max()) + 1 if len(images) else 0
    assert direct_visual.shape[0] == num_images, (direct_visual.shape, num_images)
    rows, kept = [], []
    start = 0
    for image in range(num_images):
        where = (images == image).nonzero().flatten()
        first, last = int(where[0]), int(where[-1])
        assert last - first + 1 == len(where), "an image's slots must be contiguous"
        rows += [fused[start:first], direct_visual[image].to(fused.dtype)]
        kept += [positions[start:first], torch.full((direct_visual.shape[1],), NOT_TEXT)]
        start = last + 1
    rows.append(fused[start:])
    kept.append(positions[start:])
    return DraftContext(torch.cat(rows), torch.cat(kept))
