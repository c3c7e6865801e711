"""Which visual rows the drafter's context gets for a prompt's images, by the config's switches.

decouple + compress: latents of the projected visual embeddings (from the vision encoder when it
ran our compressor, else computed here) · compress alone: latents of the target's hidden states at
the visual positions (FLASH's latent-aware variant) · decouple alone: the visual embeddings
themselves (MSD) · neither: None, the fused rows stay (EAGLE / FLASH baseline) · drop: no rows at
all (language-only drafting).
"""

from __future__ import annotations

import torch

from draft_service.feature.config import FeatureDrafterConfig
from draft_service.feature.model import FeatureDraftModel
from speculum.errors import InvalidArgument


def direct_visual_rows(
    model: FeatureDraftModel,
    visual_embeds: torch.Tensor | None,
    slot_hidden: torch.Tensor | None,
    latents: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """[I, n, D] rows replacing each image's visual rows, or None to keep fused rows.

    visual_embeds: [I, N, D] projected visual embeddings · slot_hidden: [I, N, D] the target's
    hidden states at the visual positions · latents: [I, C, D] from the vision encoder, or None.
    """
    config: FeatureDrafterConfig = model.config
    if config.drop_visual:
        return _required(slot_hidden)[:, :0]  # [I, 0, D]: each image's rows replaced by none
    if config.compress_visual and config.decouple_visual:
        if latents is not None:
            if latents.shape[1:] != (config.num_latents, config.hidden_size):
                raise InvalidArgument("drafter_latents", f"expected [I, {config.num_latents}, "
                                      f"{config.hidden_size}], got {list(latents.shape)}")
            return latents
        return model.compressor(_required(visual_embeds))
    if config.compress_visual:
        return model.compressor(_required(slot_hidden))
    if config.decouple_visual:
        return _required(visual_embeds)
    return None


def _required(features: torch.Tensor | None) -> torch.Tensor:
    if features is None:
        raise InvalidArgument("images", "the feature drafter needs the projected visual embeddings")
    assert features.dim() == 3, features.shape
    return features
