"""Turning a user's prompt and images into `PromptInputs`, with the target's chat template and processor."""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image, UnidentifiedImageError

from speculum.errors import InvalidArgument
from speculum.records import PromptInputs


class PromptBuilder:
    """Chat-templates and tokenizes prompts; preprocesses images for the target's vision tower."""

    def __init__(self, tokenizer, image_processor=None, image_token_id: int | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = image_token_id

    def build(self, prompt: str, images: Sequence[bytes | Image.Image] = ()) -> PromptInputs:
        if not prompt or not prompt.strip():
            raise InvalidArgument("prompt", "must not be empty")
        if images and (self.image_processor is None or self.image_token_id is None):
            raise InvalidArgument("images", "this target is text-only and takes no images")
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        token_ids = tuple(self.tokenizer(text, add_special_tokens=False).input_ids)
        if self.image_token_id is not None and token_ids.count(self.image_token_id) != len(images):
            raise InvalidArgument("prompt", "must not contain the image placeholder token itself")
        if not images:
            return PromptInputs(token_ids)
        decoded = [_as_rgb(image, f"images[{i}]") for i, image in enumerate(images)]
        pixel_values = self.image_processor(decoded, return_tensors="pt")["pixel_values"]
        return PromptInputs(token_ids, pixel_values=torch.as_tensor(pixel_values))

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


def _as_rgb(image: bytes | Image.Image, field: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(io.BytesIO(image)) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidArgument(field, f"not a decodable image ({exc})") from exc
