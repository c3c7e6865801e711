"""What one image encodes to, and its byte form for Redis: safetensors, never pickle.

safetensors checks its own header and byte counts, so a corrupt or foreign value fails to load
cleanly (`CorruptEntry`) instead of executing anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

# Bump when the stored layout changes; it is part of the model fingerprint, so old entries just miss.
FORMAT = "speculum.image_encoding.v1"


class CorruptEntry(ValueError):
    """A cached value that is not a valid encoding (truncated, foreign, or from another layout)."""


@dataclass(frozen=True)
class ImageEncoding:
    """The tensors one image yields; shared read-only between the cache and every caller.

    pixel_values: [3, H, W] as the target's image processor produced them.
    visual_embeds: [N, D] vision tower + projector output, what the target consumes.
    drafter_latents: [C, D'] compressed latents for the drafter, or None without a compressor.
    """

    pixel_values: torch.Tensor
    visual_embeds: torch.Tensor
    drafter_latents: torch.Tensor | None = None

    def __post_init__(self) -> None:
        assert self.pixel_values.dim() == 3 and self.pixel_values.shape[0] == 3, self.pixel_values.shape
        assert self.visual_embeds.dim() == 2, self.visual_embeds.shape
        assert self.drafter_latents is None or self.drafter_latents.dim() == 2, self.drafter_latents.shape

    @property
    def nbytes(self) -> int:
        tensors = (self.pixel_values, self.visual_embeds, self.drafter_latents)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def to_bytes(encoding: ImageEncoding) -> bytes:
    tensors = {"pixel_values": encoding.pixel_values, "visual_embeds": encoding.visual_embeds}
    if encoding.drafter_latents is not None:
        tensors["drafter_latents"] = encoding.drafter_latents
    return save({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, metadata={"format": FORMAT})


def from_bytes(data: bytes) -> ImageEncoding:
    """Parse `to_bytes` output; raise CorruptEntry on anything else."""
    try:
        tensors = load(data)
    except SafetensorError as exc:
        raise CorruptEntry(f"not a safetensors value: {exc}") from exc
    if not {"pixel_values", "visual_embeds"} <= tensors.keys() <= {"pixel_values", "visual_embeds", "drafter_latents"}:
        raise CorruptEntry(f"unexpected tensors {sorted(tensors)}")
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    pixels_ok = len(shapes["pixel_values"]) == 3 and shapes["pixel_values"][0] == 3
    if not pixels_ok or any(len(shapes[name]) != 2 for name in shapes if name != "pixel_values"):
        raise CorruptEntry(f"unexpected shapes {shapes}")
    return ImageEncoding(tensors["pixel_values"], tensors["visual_embeds"], tensors.get("drafter_latents"))
