"""The vision_encoder service: real gRPC servers on port 0, a real redis-server on a free port.

Covers: results equal the target's own vision tower, cache hits skip the tower (Redis and the LRU
fallback), a Redis outage is a miss not a failure and heals by itself, fingerprints separate models,
every kind of bad image is INVALID_ARGUMENT naming images[i], and health + reflection answer.
"""

from __future__ import annotations

import io
import logging
import struct
import time
import zlib

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image
from transformers import AutoImageProcessor

from speculum.errors import InvalidArgument
from speculum.rpc.settings import ServerSettings
from speculum.tiny import TinySpec, save_tiny_checkpoint
from speculum.v1 import vision_pb2, vision_pb2_grpc
from speculum.vlm import VisionLanguageModel
from conftest import png_bytes
from speculum.local_redis import RedisServer, redis_binary
from vision_encoder.cache import CacheSettings, LocalLRUCache, RedisEmbeddingCache, make_cache
from vision_encoder.convert import encoded_from_proto
from vision_encoder.encoder import ImageEncoder
from vision_encoder.entry import ImageEncoding
from vision_encoder.fingerprint import compressor_fingerprint
from vision_encoder.images import ImageLimits
from vision_encoder.server import SERVICE_NAME, serve, serve_encoder

needs_redis = pytest.mark.skipif(redis_binary() is None, reason="the redis-server binary is not installed")
LIMITS = ImageLimits(max_images=4, max_bytes=100_000, max_pixels=1_000_000)


# --- fixtures and helpers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vlm(llava_dir):
    return VisionLanguageModel.from_pretrained(llava_dir)


@pytest.fixture(scope="module")
def processor(llava_dir):
    return AutoImageProcessor.from_pretrained(llava_dir, local_files_only=True)


@pytest.fixture(scope="module")
def redis_server():
    if redis_binary() is None:
        pytest.skip("the redis-server binary is not installed")
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server):
    if not redis_server.running:
        redis_server.start()
    with redis_server.client() as client:
        client.flushdb()
    return redis_server.url


@pytest.fixture
def vision_calls(vlm, monkeypatch):
    """Counts calls into the vision tower + projector (the work a cache hit must skip)."""
    calls = []
    original = vlm.encode_images

    def counting(pixel_values):
        calls.append(pixel_values.shape[0])
        return original(pixel_values)

    monkeypatch.setattr(vlm, "encode_images", counting)
    return calls


class Service:
    """A running server plus a stub; `encode` returns decoded results."""

    def __init__(self, running):
        self.running = running
        self.channel = grpc.insecure_channel(running.address)
        self.stub = vision_pb2_grpc.VisionEncoderStub(self.channel)

    def encode(self, images):
        response = self.stub.Encode(vision_pb2.EncodeRequest(images=images), timeout=30)
        return [encoded_from_proto(message, i) for i, message in enumerate(response.images)]

    def close(self):
        self.channel.close()
        self.running.stop()


@pytest.fixture
def start_service():
    services = []

    def start(encoder):
        services.append(Service(serve_encoder(encoder, ServerSettings(port=0, max_workers=4, grace_s=0))))
        return services[-1]

    yield start
    for service in services:
        service.close()


def redis_settings(url: str) -> CacheSettings:
    return CacheSettings(redis_url=url, ttl_s=60, socket_timeout_s=0.5, retry_after_s=0.2)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A few hundred bytes of valid PNG structure whose header claims width x height RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def pillow_bytes(image_format: str, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buffer, format=image_format)
    return buffer.getvalue()


class PoolCompressor(torch.nn.Module):
    """A stand-in drafter-latent compressor: average-pool N visual tokens to C, then a linear map."""

    def __init__(self, dim: int, num_latents: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.num_latents = num_latents
        self.proj = torch.nn.Linear(dim, dim // 2)

    def forward(self, visual_embeds):  # [I, N, D] -> [I, C, D/2]
        pooled = torch.nn.functional.adaptive_avg_pool1d(visual_embeds.transpose(1, 2), self.num_latents)
        return self.proj(pooled.transpose(1, 2))


# --- results ----------------------------------------------------------------------------------------
def test_encode_matches_the_targets_vision_tower(vlm, processor, start_service):
    images = [png_bytes(1), png_bytes(2, size=57)]
    service = start_service(ImageEncoder(vlm, processor, LocalLRUCache(CacheSettings()), LIMITS))
    results = service.encode(images)

    decoded = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    pixel_values = processor(decoded, return_tensors="pt")["pixel_values"]
    expected = vlm.encode_images(pixel_values)  # [I, N, D]
    assert len(results) == 2
    for i, result in enumerate(results):
        image_size = vlm.config.vision_config.image_size
        assert result.pixel_values.shape == (3, image_size, image_size)
        assert result.visual_embeds.shape == (vlm.num_image_tokens, vlm.hidden_size)
        assert torch.equal(result.pixel_values, pixel_values[i])
        assert torch.equal(result.visual_embeds, expected[i])
        assert result.drafter_latents is None
        assert not result.cache_hit
    assert results[0].key != results[1].key


def test_compressor_latents_travel_and_change_the_fingerprint(vlm, processor, start_service):
    compressor = PoolCompressor(vlm.hidden_size)
    plain = ImageEncoder(vlm, processor, LocalLRUCache(CacheSettings()), LIMITS)
    with_latents = ImageEncoder(vlm, processor, LocalLRUCache(CacheSettings()), LIMITS, compressor=compressor)
    assert plain.fingerprint != with_latents.fingerprint
    [result] = start_service(with_latents).encode([png_bytes(3)])
    assert result.drafter_latents.shape == (4, vlm.hidden_size // 2)
    expected = compressor(result.visual_embeds.unsqueeze(0))[0]
    torch.testing.assert_close(result.drafter_latents, expected)
    with pytest.raises(TypeError):
        compressor_fingerprint(lambda embeds: embeds)


def test_duplicate_images_in_one_request_are_encoded_once(vlm, processor, vision_calls):
    encoder = ImageEncoder(vlm, processor, LocalLRUCache(CacheSettings()), LIMITS)
    first, second, other = encoder.encode([png_bytes(4), png_bytes(4), png_bytes(5)])
    assert vision_calls == [2]
    assert first.key == second.key != other.key
    assert torch.equal(first.visual_embeds, second.visual_embeds)


# --- caching ----------------------------------------------------------------------------------------
@needs_redis
def test_second_encode_is_a_redis_hit_without_the_vision_tower(
    vlm, processor, redis_url, redis_server, vision_calls, start_service
):
    cache = RedisEmbeddingCache(redis_settings(redis_url))
    service = start_service(ImageEncoder(vlm, processor, cache, LIMITS))
    [first] = service.encode([png_bytes(10)])
    assert not first.cache_hit and vision_calls == [1]

    [second] = service.encode([png_bytes(10)])
    assert second.cache_hit and vision_calls == [1], "a hit must not run the vision tower"
    assert second.key == first.key
    assert torch.equal(second.visual_embeds, first.visual_embeds)
    assert torch.equal(second.pixel_values, first.pixel_values)
    assert cache.stats().hits == 1 and cache.stats().stores == 1

    with redis_server.client() as client:
        ttl_ms = client.pttl("speculum:enc:" + first.key)
    assert 0 < ttl_ms <= 60_000


@needs_redis
def test_a_shared_redis_serves_another_replica(vlm, processor, redis_url, vision_calls):
    """Two encoders (as on two hosts) with the same model share entries."""
    writer = ImageEncoder(vlm, processor, RedisEmbeddingCache(redis_settings(redis_url)), LIMITS)
    reader = ImageEncoder(vlm, processor, RedisEmbeddingCache(redis_settings(redis_url)), LIMITS)
    writer.encode([png_bytes(11)])
    [result] = reader.encode([png_bytes(11)])
    assert result.cache_hit and vision_calls == [1]


@needs_redis
def test_a_different_model_fingerprint_misses(vlm, processor, redis_url, llava_dir, tmp_path):
    same = VisionLanguageModel.from_pretrained(llava_dir)
    other_dir = save_tiny_checkpoint(tmp_path / "other", TinySpec(seed=1))
    other = VisionLanguageModel.from_pretrained(other_dir)
    first = ImageEncoder(vlm, processor, RedisEmbeddingCache(redis_settings(redis_url)), LIMITS)
    reloaded = ImageEncoder(same, processor, RedisEmbeddingCache(redis_settings(redis_url)), LIMITS)
    different = ImageEncoder(other, processor, RedisEmbeddingCache(redis_settings(redis_url)), LIMITS)
    assert reloaded.fingerprint == first.fingerprint, "the fingerprint must be stable across loads"
    assert different.fingerprint != first.fingerprint

    first.encode([png_bytes(12)])
    [result] = different.encode([png_bytes(12)])
    assert not result.cache_hit
    assert not torch.equal(result.visual_embeds, first.encode([png_bytes(12)])[0].visual_embeds)


@needs_redis
def test_a_corrupt_redis_value_is_a_miss_and_is_replaced(vlm, processor, redis_url, redis_server):
    cache = RedisEmbeddingCache(redis_settings(redis_url))
    encoder = ImageEncoder(vlm, processor, cache, LIMITS)
    [first] = encoder.encode([png_bytes(13)])
    with redis_server.client() as client:
        client.set("speculum:enc:" + first.key, b"not safetensors")
    [second] = encoder.encode([png_bytes(13)])
    assert not second.cache_hit and cache.stats().errors == 1
    [third] = encoder.encode([png_bytes(13)])
    assert third.cache_hit and torch.equal(third.visual_embeds, first.visual_embeds)


@needs_redis
def test_a_stopped_redis_is_a_miss_and_hits_come_back(
    vlm, processor, redis_url, redis_server, vision_calls, start_service, caplog
):
    cache = RedisEmbeddingCache(redis_settings(redis_url))
    service = start_service(ImageEncoder(vlm, processor, cache, LIMITS))
    service.encode([png_bytes(20)])

    redis_server.stop()
    caplog.set_level(logging.INFO, logger="speculum.vision_encoder.cache")
    started = time.monotonic()
    [down] = service.encode([png_bytes(20)])
    [paused] = service.encode([png_bytes(20)])
    assert time.monotonic() - started < 5, "an outage must not stall requests"
    assert not down.cache_hit and not paused.cache_hit
    assert cache.stats().errors >= 1 and cache.stats().bypassed >= 1
    assert any("event=cache_error" in r.message and r.levelno == logging.WARNING for r in caplog.records)

    redis_server.start()  # empty: no persistence
    time.sleep(0.25)  # past retry_after_s
    calls_before = len(vision_calls)
    [refill] = service.encode([png_bytes(20)])
    [hit] = service.encode([png_bytes(20)])
    assert not refill.cache_hit and hit.cache_hit
    assert len(vision_calls) == calls_before + 1
    assert any("event=cache_recovered" in r.message for r in caplog.records)


def test_lru_fallback_without_redis(vlm, processor, vision_calls, start_service, caplog):
    caplog.set_level(logging.INFO, logger="speculum.vision_encoder.cache")
    cache = make_cache(CacheSettings(redis_url=None))
    assert isinstance(cache, LocalLRUCache)
    assert any("no Redis configured, using an in-process LRU cache" in r.getMessage() for r in caplog.records)
    service = start_service(ImageEncoder(vlm, processor, cache, LIMITS))
    [first] = service.encode([png_bytes(30)])
    [second] = service.encode([png_bytes(30)])
    assert not first.cache_hit and second.cache_hit and vision_calls == [1]
    assert torch.equal(first.visual_embeds, second.visual_embeds)


def test_lru_evicts_least_recently_used_by_bytes():
    def encoding(fill: float) -> ImageEncoding:  # 3*2*2*4 + 4*4*4 = 112 bytes
        return ImageEncoding(torch.full((3, 2, 2), fill), torch.full((4, 4), fill))  # float32

    cache = LocalLRUCache(CacheSettings(max_bytes=300, max_entry_bytes=200))
    cache.put("a", encoding(1.0))
    cache.put("b", encoding(2.0))
    assert cache.get("a") is not None  # a becomes most recently used
    cache.put("c", encoding(3.0))  # 336 > 300: evicts b
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.total_bytes == 224 and len(cache) == 2
    cache.put("huge", ImageEncoding(torch.zeros(3, 8, 8), torch.zeros(4, 4)))  # 832 > max_entry_bytes
    assert cache.get("huge") is None and cache.stats().skipped == 1


# --- bad input --------------------------------------------------------------------------------------
BAD_IMAGES = {
    "empty": (b"", "is empty"),
    "not an image": (b"%PDF-1.4 definitely not pixels", "allowed format"),
    "truncated png": (png_bytes(40)[:300], "could not be decoded"),
    "bomb beyond pillow's guard": (png_declaring(20_000, 20_000), "too many pixels"),
    "bomb beyond our limit": (png_declaring(2_000, 2_000), "2000x2000"),
    "tiff": (pillow_bytes("TIFF"), "allowed format"),
    "ico": (pillow_bytes("ICO", 16), "allowed format"),
    "oversized": (b"\x89PNG" + bytes(LIMITS.max_bytes), "over the limit"),
}


@pytest.fixture(scope="module")
def bad_input_service(vlm, processor):
    service = Service(serve_encoder(ImageEncoder(vlm, processor, LocalLRUCache(CacheSettings()), LIMITS),
                                    ServerSettings(port=0, max_workers=2, grace_s=0)))
    yield service
    service.close()


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_images_are_invalid_argument_naming_the_image(bad_input_service, name):
    data, reason = BAD_IMAGES[name]
    with pytest.raises(grpc.RpcError) as failure:
        bad_input_service.encode([png_bytes(41), data])
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.value.details().startswith("images[1]: ") and reason in failure.value.details()
    assert len(bad_input_service.encode([png_bytes(41)])) == 1, "the server must still answer"


def test_too_many_images_is_invalid_argument(bad_input_service):
    with pytest.raises(grpc.RpcError) as failure:
        bad_input_service.encode([png_bytes(50 + i) for i in range(LIMITS.max_images + 1)])
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"images[{LIMITS.max_images}]" in failure.value.details()
    assert f"at most {LIMITS.max_images} images" in failure.value.details()


def test_bad_image_costs_no_model_call(vlm, processor, vision_calls):
    encoder = ImageEncoder(vlm, processor, LocalLRUCache(CacheSettings()), LIMITS)
    with pytest.raises(InvalidArgument) as failure:
        encoder.encode([png_bytes(60), b"garbage"])
    assert failure.value.field == "images[1]" and vision_calls == []


@pytest.mark.parametrize("image_format", ["JPEG", "WEBP", "GIF", "BMP"])
def test_allowed_formats_decode(bad_input_service, image_format):
    [result] = bad_input_service.encode([pillow_bytes(image_format, 20)])
    assert result.visual_embeds.dim() == 2


# --- service hygiene --------------------------------------------------------------------------------
def test_health_and_reflection(llava_dir):
    running = serve(llava_dir, ServerSettings(port=0, max_workers=2, grace_s=0), CacheSettings())
    try:
        with grpc.insecure_channel(running.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAME):
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                assert status == health_pb2.HealthCheckResponse.SERVING
            services = ProtoReflectionDescriptorDatabase(channel).get_services()
            assert "speculum.v1.VisionEncoder" in services
            assert "grpc.health.v1.Health" in services
    finally:
        running.stop()
