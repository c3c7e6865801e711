"""`make demo`: the whole split stack on this machine, answering questions about images.

Starts `speculum serve`'s stack (encoder, verifier, drafter, Redis, Ray Serve), sends the sample
requests through the public gRPC API, prints each answer with τ, tokens/s and image-cache hits,
checks that speculation changed nothing (same tokens as the target alone) and that the second
request on an image was served from the cache, then shuts everything down.
Uses the shipped demo pair when present, else a tiny random stand-in target with prompt lookup.
"""

from __future__ import annotations

import io
import logging
import sys
import tempfile
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from orchestrator.engine import GenerateRequest
from orchestrator.public_api import request_to_proto
from speculum.config import SamplingParams, SpeculationParams
from speculum.launcher import LocalStack, StackConfig
from speculum.logs import setup_logging
from speculum.paths import demo_drafter_dir, demo_target_dir, models_dir
from speculum.ports import free_port
from speculum.tiny import STANDIN_TARGET, save_tiny_checkpoint
from speculum.v1 import speculum_pb2_grpc

MAX_NEW_TOKENS = 96


def _models(workdir: Path) -> tuple[Path, str, list[bytes], str]:
    samples = sorted((models_dir() / "demo" / "samples").glob("*.png"))
    if (demo_target_dir() / "config.json").is_file() and samples:
        drafter = str(demo_drafter_dir()) if (demo_drafter_dir() / "config.json").is_file() else "ngram"
        return demo_target_dir(), drafter, [p.read_bytes() for p in samples[:2]], "the shipped demo target"
    images = []
    for seed in (0, 1):
        buffer = io.BytesIO()
        Image.fromarray((np.random.default_rng(seed).random((48, 48, 3)) * 255).astype("uint8")).save(buffer, "PNG")
        images.append(buffer.getvalue())
    target = save_tiny_checkpoint(workdir / "target", STANDIN_TARGET)
    return target, "ngram", images, "a tiny random stand-in target (the trained demo pair is not shipped yet)"


def _ask(stub, prompt: str, image: bytes, speculate: bool):
    request = GenerateRequest(prompt, [image], SamplingParams(max_new_tokens=MAX_NEW_TOKENS),
                              SpeculationParams(enabled=speculate))
    return stub.Generate(request_to_proto(request), timeout=300)


def main() -> int:
    setup_logging("demo", logging.WARNING)
    with tempfile.TemporaryDirectory() as workdir:
        target, drafter, images, what = _models(Path(workdir))
        print(f"Speculum demo on {what}; drafter: {Path(drafter).name if drafter != 'ngram' else 'ngram'}")
        print("starting the split stack (vision encoder, verifier, drafter, Redis, Ray Serve)...", flush=True)
        with LocalStack(StackConfig(target, drafter, port=free_port())) as stack:
            print(f"public API: speculum.v1.Speculum on {stack.address}\n")
            stub = speculum_pb2_grpc.SpeculumStub(grpc.insecure_channel(stack.address))
            questions = [("Describe the image in detail.", images[0]), ("Describe the image in detail.", images[-1]),
                         ("How many objects are there?", images[0])]
            failures = []
            for number, (prompt, image) in enumerate(questions, 1):
                reply = _ask(stub, prompt, image, speculate=True)
                alone = _ask(stub, prompt, image, speculate=False)
                seconds = reply.timing.ttft_s + reply.timing.decode_s
                print(f"[{number}] {prompt}\n    {reply.text}")
                print(f"    tokens={len(reply.token_ids)} τ={reply.speculation.mean_accepted_length:.2f} "
                      f"tokens/s={len(reply.token_ids) / max(seconds, 1e-9):.0f} "
                      f"(target alone {len(alone.token_ids) / max(alone.timing.ttft_s + alone.timing.decode_s, 1e-9):.0f}) "
                      f"image cache hits={reply.images.cache_hits}/{reply.images.count}")
                if list(reply.token_ids) != list(alone.token_ids):
                    failures.append(f"request {number}: speculation changed the output")
            if questions[2][1] is images[0] and reply.images.cache_hits != 1:
                failures.append("the repeated image was not served from the cache")
        for failure in failures:
            print(f"ERROR: {failure}", file=sys.stderr)
        if not failures:
            print("\nAll answers identical to the target alone; the repeated image came from the cache.")
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
