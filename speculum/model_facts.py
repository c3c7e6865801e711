"""What the orchestrator must know about a target without loading its weights.

Read from the checkpoint's config and generation config: vocabulary, context length, EOS ids,
the image token and how many visual tokens each image becomes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, GenerationConfig, PretrainedConfig


@dataclass(frozen=True)
class ModelFacts:
    vocab_size: int
    hidden_size: int
    max_positions: int
    eos_token_ids: frozenset[int]
    image_token_id: int | None  # None: text-only
    num_image_tokens: int  # N per image (0 when text-only)
    image_size: int | None

    @property
    def is_multimodal(self) -> bool:
        return self.image_token_id is not None

    @classmethod
    def from_config(cls, config: PretrainedConfig, generation: GenerationConfig | None) -> ModelFacts:
        text = config.get_text_config()
        eos = getattr(generation, "eos_token_id", None) if generation is not None else None
        eos = text.eos_token_id if eos is None else eos
        eos_ids = frozenset() if eos is None else frozenset(eos if isinstance(eos, (list, tuple)) else [eos])
        if config.model_type != "llava":
            return cls(text.vocab_size, text.hidden_size, text.max_position_embeddings, eos_ids, None, 0, None)
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        num_image_tokens = patches + (1 if config.vision_feature_select_strategy == "full" else 0)
        return cls(
            text.vocab_size,
            text.hidden_size,
            text.max_position_embeddings,
            eos_ids,
            config.image_token_id,
            num_image_tokens,
            vision.image_size,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelFacts:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        try:
            generation = GenerationConfig.from_pretrained(path, local_files_only=True)
        except OSError:
            generation = None
        return cls.from_config(config, generation)

    def expand_image_tokens(self, token_ids: Sequence[int]) -> list[int]:
        """Replace each image-token id by N of them, as the decoder expects."""
        if not self.is_multimodal:
            return list(token_ids)
        expanded: list[int] = []
        for token in token_ids:
            expanded.extend([token] * self.num_image_tokens if token == self.image_token_id else [token])
        return expanded
