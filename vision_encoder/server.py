"""The VisionEncoder gRPC service: a thin servicer over `ImageEncoder`, plus `serve` and `main`.

`python -m vision_encoder.server --target DIR` serves until SIGTERM/SIGINT. Settings come from the
environment: SPECULUM_ENCODER_HOST/PORT (default port 50061) and the shared server limits
(speculum.rpc.settings), the cache (vision_encoder.cache.CacheSettings) and the image limits
(vision_encoder.images.ImageLimits).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from opentelemetry import trace

from speculum.logs import setup_logging
from speculum.metrics import image_cache_collector
from speculum.rpc.server import RunningServer, run_until_signal, start_server
from speculum.rpc.settings import ServerSettings
from speculum.rpc.status import mapped
from speculum.telemetry import setup_tracing, tracer
from speculum.v1 import vision_pb2, vision_pb2_grpc
from vision_encoder.cache import CacheSettings, CacheStats, EmbeddingCache, make_cache
from vision_encoder.convert import encoded_to_proto
from vision_encoder.encoder import ImageEncoder, LatentCompressor
from vision_encoder.entry import ImageEncoding
from vision_encoder.images import ImageLimits

log = logging.getLogger("speculum.vision_encoder")

SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["VisionEncoder"].full_name
DEFAULT_PORT = 50061


class VisionEncoderServicer(vision_pb2_grpc.VisionEncoderServicer):
    """proto -> `ImageEncoder.encode` -> proto; typed errors become gRPC statuses via `mapped`."""

    def __init__(self, encoder: ImageEncoder):
        self.encoder = encoder

    @mapped
    def Encode(self, request: vision_pb2.EncodeRequest, context) -> vision_pb2.EncodeResponse:
        result = self.encoder.encode_with_stats(list(request.images))
        stats = result.stats
        trace.get_current_span().set_attributes(
            {"speculum.images": stats.images, "speculum.cache_hits": stats.hits, "speculum.encoded": stats.encoded}
        )
        log.info(
            "event=encode images=%d hits=%d encoded=%d encode_ms=%.1f",
            stats.images,
            stats.hits,
            stats.encoded,
            stats.encode_s * 1000,
        )
        return vision_pb2.EncodeResponse(images=[encoded_to_proto(image) for image in result.images])


class TracedCache:
    """An EmbeddingCache with a span per lookup and store, so a trace shows whether each image
    came from the cache (`cache.hit`) or paid for the vision tower."""

    def __init__(self, cache: EmbeddingCache):
        self.inner = cache

    def get(self, key: str) -> ImageEncoding | None:
        with tracer().start_as_current_span("speculum.cache.lookup") as span:
            found = self.inner.get(key)
            span.set_attribute("cache.hit", found is not None)
            return found

    def put(self, key: str, encoding: ImageEncoding) -> None:
        with tracer().start_as_current_span("speculum.cache.store"):
            self.inner.put(key, encoding)

    def stats(self) -> CacheStats:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()


def serve_encoder(encoder: ImageEncoder, settings: ServerSettings) -> RunningServer:
    """Start the service (with health and reflection) around an existing encoder."""
    servicer = VisionEncoderServicer(encoder)
    return start_server(
        settings,
        register=[lambda server: vision_pb2_grpc.add_VisionEncoderServicer_to_server(servicer, server)],
        service_names=[SERVICE_NAME],
        servicer=servicer,
        collectors=[image_cache_collector(encoder.cache.stats)],
    )


def serve(
    target_dir: str | Path,
    settings: ServerSettings,
    cache_settings: CacheSettings,
    limits: ImageLimits | None = None,
    compressor: LatentCompressor | None = None,
) -> RunningServer:
    """Load the target's vision side from `target_dir` and serve it; returns once the port is bound."""
    cache = TracedCache(make_cache(cache_settings))
    encoder = ImageEncoder.from_pretrained(target_dir, cache, limits, compressor)
    log.info("event=encoder_ready target=%s fingerprint=%s", target_dir, encoder.fingerprint[:16])
    return serve_encoder(encoder, settings)


def drafter_compressor(drafter: str | None) -> LatentCompressor | None:
    """The trained latent compressor of a feature drafter folder, or None (no compression here)."""
    from draft_service.feature.checkpoint import is_feature_drafter, load_checkpoint

    if not drafter or not is_feature_drafter(drafter):
        return None
    compressor = load_checkpoint(drafter).compressor
    return None if compressor is None else compressor.float().eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the Speculum VisionEncoder over gRPC.")
    parser.add_argument("--target", required=True, type=Path, help="local llava-hf target folder")
    parser.add_argument("--drafter", default=None, help="the drafter (ngram | DIR): a feature drafter's "
                        "trained compressor then runs here, once per image")
    args = parser.parse_args(argv)
    setup_logging("vision-encoder")
    setup_tracing("vision-encoder")  # before the server is built: instrumentation patches grpc.server
    settings = ServerSettings.from_env("ENCODER", default_port=DEFAULT_PORT)
    running = serve(args.target, settings, CacheSettings.from_env(), ImageLimits.from_env(),
                    drafter_compressor(args.drafter))
    run_until_signal(running, settings.grace_s)


if __name__ == "__main__":
    main()
