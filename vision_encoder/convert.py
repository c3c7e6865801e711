"""vision.proto messages <-> `EncodedImage`: the only place that knows both (servers and clients use it)."""

from __future__ import annotations

from speculum.rpc.convert import tensor_from_proto, tensor_to_proto
from speculum.v1 import vision_pb2
from vision_encoder.encoder import EncodedImage


def encoded_to_proto(image: EncodedImage) -> vision_pb2.EncodedImage:
    return vision_pb2.EncodedImage(
        key=image.key,
        cache_hit=image.cache_hit,
        pixel_values=tensor_to_proto(image.pixel_values),
        visual_embeds=tensor_to_proto(image.visual_embeds),
        drafter_latents=tensor_to_proto(image.drafter_latents),
    )


def encoded_from_proto(message: vision_pb2.EncodedImage, index: int) -> EncodedImage:
    """For clients: `index` names the image in errors (`images[i].visual_embeds`)."""
    field = f"images[{index}]"
    pixel_values = tensor_from_proto(message.pixel_values, f"{field}.pixel_values")
    visual_embeds = tensor_from_proto(message.visual_embeds, f"{field}.visual_embeds")
    if pixel_values is None or visual_embeds is None:
        raise ValueError(f"{field}: the encoder's response lacks pixel values or visual embeddings")
    return EncodedImage(
        key=message.key,
        cache_hit=message.cache_hit,
        pixel_values=pixel_values,
        visual_embeds=visual_embeds,
        drafter_latents=tensor_from_proto(message.drafter_latents, f"{field}.drafter_latents"),
    )
