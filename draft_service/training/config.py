"""Configs of drafter training: the data to collect and the optimisation. Frozen; computes nothing.

The schedule (learning rate, curriculum, batches, noise) is a function of (seed, step) only, so a
resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path


class AnswerSource(enum.Enum):
    """Which answers the drafter is taught to predict."""

    SELF = "self"  # the target's own greedy answers (self-distillation): what it will be asked to draft
    DATASET = "dataset"  # the data set's reference answers (teacher forcing, as MSD and FLASH train)


@dataclass(frozen=True)
class DataConfig:
    """text_samples / image_samples: training sequences per pool (demo items, or records of a local
    file) · eval_samples: held-out image prompts for the acceptance evaluation (demo describe
    scenes, or records split off a local file), and as many held-out text prompts · max_new_tokens:
    cap on self-distilled answers · seed: which demo-world items are drawn and which file records
    are held out."""

    text_samples: int = 200
    image_samples: int = 600
    eval_samples: int = 30
    answers: AnswerSource = AnswerSource.SELF
    max_new_tokens: int = 160
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.text_samples, self.image_samples, self.eval_samples) < 0 or self.max_new_tokens < 1:
            raise ValueError("sample counts must be >= 0 and max_new_tokens >= 1")
        if self.text_samples + self.image_samples == 0:
            raise ValueError("no training data")


@dataclass(frozen=True)
class LocalFiles:
    """Local data replacing the demo generator, per modality (None: demo items) · text_jsonl:
    ShareGPT-style JSONL · llava_json: LLaVA-style JSON whose image paths are relative to
    image_folder (the two go together). Formats and the held-out split: training/local_data.py."""

    text_jsonl: Path | None = None
    llava_json: Path | None = None
    image_folder: Path | None = None

    def __post_init__(self) -> None:
        if (self.llava_json is None) != (self.image_folder is None):
            raise ValueError("a LLaVA JSON file and its image folder go together")

    @property
    def any(self) -> bool:
        return self.text_jsonl is not None or self.llava_json is not None


@dataclass(frozen=True)
class OptimConfig:
    """steps / batch_size: optimizer steps and sequences per step · lr: peak AdamW rate, reached
    after `warmup_steps`, then cosine to `min_lr_ratio` of it · grad_clip: max gradient norm ·
    text_only_fraction: MSD stage 1, the share of steps on text-only data; stage 2 ramps the
    multimodal share linearly to 1.0 at the last step · noise: uniform noise width on input
    features · feature_weight / ce_weight: the two loss terms · lookahead_weight: the look-ahead
    term (training/objective.py; 0 = off; on, a step runs a second forward) · checkpoint_every / eval_every: in
    steps (0 = only at the end) · eval_k: draft length of the acceptance evaluation."""

    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.5
    text_only_fraction: float = 0.3
    noise: float = 0.2
    feature_weight: float = 1.0
    ce_weight: float = 0.1
    lookahead_weight: float = 0.0
    checkpoint_every: int = 200
    eval_every: int = 0
    eval_k: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.warmup_steps < 0 or self.eval_k < 1:
            raise ValueError("steps, batch_size and eval_k must be positive, warmup_steps non-negative")
        if not 0 <= self.text_only_fraction < 1 or not 0 < self.min_lr_ratio <= 1:
            raise ValueError("text_only_fraction must be in [0, 1), min_lr_ratio in (0, 1]")
        if self.lookahead_weight < 0:
            raise ValueError("lookahead_weight must be non-negative")
        if self.lr <= 0 or self.grad_clip <= 0 or self.checkpoint_every < 0 or self.eval_every < 0:
            raise ValueError("lr and grad_clip must be positive; checkpoint/eval intervals non-negative")
