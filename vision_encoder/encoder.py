"""The encoder core: image bytes -> pixel values, visual embeddings and drafter latents, via the cache.

Each distinct image is looked up by content key first; the misses are decoded, preprocessed and run
through the vision tower + projector in one batch, then stored. No grpc here: the server wraps it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor

from speculum.vlm import VisionLanguageModel
from vision_encoder.cache import EmbeddingCache
from vision_encoder.entry import ImageEncoding
from vision_encoder.fingerprint import model_fingerprint
from vision_encoder.images import ImageLimits, check_request, decode_image

log = logging.getLogger("speculum.vision_encoder")

# [I, N, D] visual embeds -> [I, C, D'] drafter latents (FLASH-style compression, trained with the drafter).
LatentCompressor = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EncodedImage:
    """One image's result. key: sha256(bytes) + ":" + fingerprint. cache_hit: served from the cache.
    pixel_values [3, H, W] · visual_embeds [N, D] · drafter_latents [C, D'] or None (no compressor)."""

    key: str
    cache_hit: bool
    pixel_values: torch.Tensor
    visual_embeds: torch.Tensor
    drafter_latents: torch.Tensor | None


@dataclass(frozen=True)
class EncodeStats:
    """One `encode` call, for logs and spans at the edge."""

    images: int
    hits: int
    encoded: int
    encode_s: float  # decoding, preprocessing and the model call for the misses


@dataclass(frozen=True)
class EncodeResult:
    images: list[EncodedImage]
    stats: EncodeStats


def content_key(data: bytes, fingerprint: str) -> str:
    """The cache key of one image: sha256 of its exact bytes, then the model fingerprint."""
    return f"{hashlib.sha256(data).hexdigest()}:{fingerprint}"


class ImageEncoder:
    """Encodes image bytes for one target (and optionally one drafter compressor), through a cache."""

    def __init__(
        self,
        model: VisionLanguageModel,
        image_processor: Any,
        cache: EmbeddingCache,
        limits: ImageLimits | None = None,
        compressor: LatentCompressor | None = None,
        fingerprint: str | None = None,
    ):
        """`fingerprint` overrides the computed one (e.g. a release id, to skip hashing weights)."""
        if not model.is_multimodal:
            raise ValueError("the target is text-only: it has no vision tower to encode images with")
        self.model = model
        self.image_processor = image_processor
        self.cache = cache
        self.limits = limits or ImageLimits()
        self.compressor = compressor
        self.fingerprint = fingerprint or model_fingerprint(model, image_processor, compressor)

    @classmethod
    def from_pretrained(
        cls,
        target_dir: str | Path,
        cache: EmbeddingCache,
        limits: ImageLimits | None = None,
        compressor: LatentCompressor | None = None,
    ) -> ImageEncoder:
        """Load the target and its image processor from a local llava-hf folder (nothing is downloaded)."""
        model = VisionLanguageModel.from_pretrained(target_dir)
        processor = AutoImageProcessor.from_pretrained(target_dir, local_files_only=True)
        return cls(model, processor, cache, limits, compressor)

    def encode(self, images: Sequence[bytes]) -> list[EncodedImage]:
        """Encode each image (InvalidArgument names the bad `images[i]`); results keep the input order."""
        return self.encode_with_stats(images).images

    def encode_with_stats(self, images: Sequence[bytes]) -> EncodeResult:
        """`encode`, plus what it cost (hits, images run through the model, seconds)."""
        check_request(images, self.limits)
        keys = [content_key(data, self.fingerprint) for data in images]
        cached: dict[str, ImageEncoding] = {}
        first_index: dict[str, int] = {}
        for index, key in enumerate(keys):
            if key in first_index:
                continue  # the same bytes twice in one request: look up and encode once
            first_index[key] = index
            hit = self.cache.get(key)
            if hit is not None:
                cached[key] = hit
        missing = [key for key in first_index if key not in cached]
        started = time.perf_counter()
        fresh = self._encode_batch(images, [first_index[key] for key in missing])
        for key, encoding in zip(missing, fresh):
            self.cache.put(key, encoding)
        stats = EncodeStats(len(images), len(cached), len(missing), time.perf_counter() - started)
        found = {**cached, **dict(zip(missing, fresh))}
        results = [
            EncodedImage(
                key=key,
                cache_hit=key in cached,
                pixel_values=found[key].pixel_values,
                visual_embeds=found[key].visual_embeds,
                drafter_latents=found[key].drafter_latents,
            )
            for key in keys
        ]
        return EncodeResult(results, stats)

    def _encode_batch(self, images: Sequence[bytes], indices: Sequence[int]) -> list[ImageEncoding]:
        """Encode `images[i]` for each i in `indices` in one model call. Every image is decoded before
        the model runs, so one bad image costs no compute."""
        if not indices:
            return []
        decoded = [decode_image(images[index], index, self.limits) for index in indices]
        pixel_values = torch.as_tensor(self.image_processor(decoded, return_tensors="pt")["pixel_values"])
        assert pixel_values.dim() == 4 and pixel_values.shape[:2] == (len(indices), 3), pixel_values.shape
        visual_embeds = self.model.encode_images(pixel_values).to("cpu")  # [I, N, D]
        latents = None
        if self.compressor is not None:
            with torch.inference_mode():
                latents = self.compressor(visual_embeds).to("cpu")  # [I, C, D']
            assert latents.dim() == 3 and latents.shape[0] == len(indices), latents.shape
        # clone(): each cached entry owns its memory, so evicting one frees it (no shared batch storage).
        return [
            ImageEncoding(
                pixel_values=pixel_values[i].clone(),
                visual_embeds=visual_embeds[i].clone(),
                drafter_latents=None if latents is None else latents[i].clone(),
            )
            for i in range(len(indices))
        ]
