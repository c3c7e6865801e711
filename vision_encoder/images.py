"""Decoding untrusted image bytes with Pillow, under explicit limits: the one place images are decoded.

Every rejection is an `InvalidArgument` naming `images[i]` with a reason a client can act on.
This module only decodes and validates; it knows nothing of processors, models or caches.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from speculum.errors import InvalidArgument

DEFAULT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

# Pillow's plugins raise many unrelated types on malformed input (truncated data, bad chunks,
# broken headers); any of them means "these bytes are not a valid image", never a server fault.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, zlib.error)


@dataclass(frozen=True)
class ImageLimits:
    """What one Encode request may contain.

    max_images: images per request.
    max_bytes: encoded size of one image.
    max_pixels: width * height of one image, checked from the header before any pixel is decoded
        (the decompression-bomb guard). It may not exceed Pillow's own guard
        (`Image.MAX_IMAGE_PIXELS`), which stays in place as a second line of defence.
    formats: Pillow format names that may be opened; other parsers never see the bytes.
    """

    max_images: int = 16
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 36_000_000
    formats: tuple[str, ...] = DEFAULT_FORMATS

    def __post_init__(self) -> None:
        if self.max_images < 1 or self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"image limits must be positive: {self}")
        if Image.MAX_IMAGE_PIXELS is not None and self.max_pixels > Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"max_pixels {self.max_pixels} exceeds Pillow's guard of {Image.MAX_IMAGE_PIXELS}")
        Image.init()  # registers the plugins so that unknown names are caught here, not per request
        unknown = [name for name in self.formats if name not in Image.OPEN]
        if not self.formats or unknown:
            raise ValueError(f"unknown or no image formats: {unknown or self.formats}")

    @classmethod
    def from_env(cls) -> ImageLimits:
        """SPECULUM_MAX_IMAGES, SPECULUM_IMAGE_MAX_BYTES, SPECULUM_IMAGE_MAX_PIXELS and
        SPECULUM_IMAGE_FORMATS (comma-separated Pillow names)."""
        formats = os.environ.get("SPECULUM_IMAGE_FORMATS", "")
        return cls(
            max_images=int(os.environ.get("SPECULUM_MAX_IMAGES") or cls.max_images),
            max_bytes=int(os.environ.get("SPECULUM_IMAGE_MAX_BYTES") or cls.max_bytes),
            max_pixels=int(os.environ.get("SPECULUM_IMAGE_MAX_PIXELS") or cls.max_pixels),
            formats=tuple(f.strip().upper() for f in formats.split(",") if f.strip()) or DEFAULT_FORMATS,
        )


def check_request(images: Sequence[bytes], limits: ImageLimits) -> None:
    """The checks that need no decoding (count, emptiness, size): run on every image, cached or not."""
    if len(images) > limits.max_images:
        raise InvalidArgument(
            f"images[{limits.max_images}]",
            f"is one too many: at most {limits.max_images} images per request (got {len(images)})",
        )
    for index, data in enumerate(images):
        _check_size(data, index, limits)


def _check_size(data: bytes, index: int, limits: ImageLimits) -> None:
    if not data:
        raise InvalidArgument(f"images[{index}]", "is empty")
    if len(data) > limits.max_bytes:
        raise InvalidArgument(f"images[{index}]", f"is {len(data)} bytes, over the limit of {limits.max_bytes} bytes")


def decode_image(data: bytes, index: int, limits: ImageLimits) -> Image.Image:
    """Decode one image to RGB (the first frame of an animation), or raise InvalidArgument(images[index])."""
    field = f"images[{index}]"
    _check_size(data, index, limits)
    try:
        # `formats` keeps every other Pillow parser away from untrusted bytes.
        with Image.open(io.BytesIO(data), formats=limits.formats) as image:
            width, height = image.size
            # Image.open only parsed the header: this is the last moment a bomb is cheap to refuse.
            if width * height > limits.max_pixels:
                raise InvalidArgument(
                    field, f"declares {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}"
                )
            return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        limit = limits.max_pixels
        raise InvalidArgument(field, f"declares too many pixels, over the limit of {limit} ({exc})") from exc
    except UnidentifiedImageError as exc:
        allowed = ", ".join(limits.formats)
        raise InvalidArgument(field, f"is not an image in an allowed format ({allowed})") from exc
    except _DECODE_ERRORS as exc:
        raise InvalidArgument(field, f"could not be decoded: {exc}") from exc


def decode_images(images: Sequence[bytes], limits: ImageLimits) -> list[Image.Image]:
    """Check the request, then decode each image to RGB (see `decode_image`)."""
    check_request(images, limits)
    return [decode_image(data, index, limits) for index, data in enumerate(images)]
