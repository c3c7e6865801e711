"""Step -> learning rate and step -> multimodal share (MSD's two-stage curriculum). Pure functions."""

from __future__ import annotations

import math

from draft_service.training.config import OptimConfig


def learning_rate(config: OptimConfig, step: int) -> float:
    """Linear warm-up to the peak, then cosine down to min_lr_ratio · peak at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def multimodal_share(config: OptimConfig, step: int) -> float:
    """Stage 1 (the first text_only_fraction of steps): 0. Stage 2: a linear ramp reaching 1.0 at the end."""
    stage1 = int(config.steps * config.text_only_fraction)
    if step < stage1:
        return 0.0
    return min(1.0, (step - stage1 + 1) / max(1, config.steps - stage1))
