"""Turning a user's prompt into chat-templated token ids, and encoded images into `PromptInputs`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer

from speculum.errors import InvalidArgument
from speculum.model_facts import ModelFacts
from speculum.records import PromptInputs
from vision_encoder.encoder import EncodedImage


class PromptBuilder:
    """Chat-templates and tokenizes prompts with the target's tokenizer."""

    def __init__(self, tokenizer, image_token_id: int | None = None):
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id

    @classmethod
    def from_pretrained(cls, target_dir: str | Path, facts: ModelFacts) -> PromptBuilder:
        """The target folder's tokenizer; no weights."""
        return cls(AutoTokenizer.from_pretrained(target_dir, local_files_only=True), facts.image_token_id)

    def tokenize(self, prompt: str, num_images: int) -> tuple[int, ...]:
        """The templated prompt with one image token per image."""
        if not prompt or not prompt.strip():
            raise InvalidArgument("prompt", "must not be empty")
        if num_images and self.image_token_id is None:
            raise InvalidArgument("images", "this target is text-only and takes no images")
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        token_ids = tuple(self.tokenizer(text, add_special_tokens=False).input_ids)
        if self.image_token_id is not None and token_ids.count(self.image_token_id) != num_images:
            raise InvalidArgument("prompt", "must not contain the image placeholder token itself")
        return token_ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


def prompt_inputs(token_ids: tuple[int, ...], images: Sequence[EncodedImage]) -> PromptInputs:
    """Stack per-image encodings into the batch tensors PromptInputs carries."""
    if not images:
        return PromptInputs(token_ids)
    latents = [image.drafter_latents for image in images]
    return PromptInputs(
        token_ids,
        pixel_values=torch.stack([image.pixel_values for image in images]),  # [I, 3, H, W]
        visual_embeds=torch.stack([image.visual_embeds for image in images]),  # [I, N, D]
        drafter_latents=None if any(t is None for t in latents) else torch.stack(latents),  # [I, C, D']
    )
