"""`make demo` (for now in-process): one request answered with and without speculation.

Uses the shipped demo target when it exists, else a tiny random stand-in built on the fly.
Prints each drafter's output and speculation stats, and fails if any output differs from the
target decoding alone (the losslessness contract). The split stack comes with the services issue.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from draft_service.ngram import NgramDrafter
from draft_service.vlm_drafter import VlmDrafter
from orchestrator.engine import Engine, GenerateRequest
from speculum.config import SamplingParams, SpeculationParams
from speculum.paths import demo_target_dir, models_dir
from speculum.tiny import STANDIN_DRAFTER, STANDIN_TARGET, build_tiny_model, save_tiny_checkpoint, tiny_tokenizer
from speculum.vlm import VisionLanguageModel


def _engine_and_request(workdir: Path) -> tuple[Engine, GenerateRequest, str]:
    sample_images = sorted((models_dir() / "demo" / "samples").glob("*.png"))
    if (demo_target_dir() / "config.json").is_file() and sample_images:
        engine = Engine.from_pretrained(demo_target_dir())
        request = GenerateRequest("Describe the image in detail.", [sample_images[0].read_bytes()])
        return engine, request, f"shipped demo target, image {sample_images[0].name}"
    engine = Engine.from_pretrained(save_tiny_checkpoint(workdir / "target", STANDIN_TARGET))
    request = GenerateRequest("Describe the image in detail.")
    return engine, request, "tiny random stand-in target (the trained demo pair is not shipped yet)"


def main() -> int:
    hf_logging.disable_progress_bar()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as workdir:
        engine, request, what = _engine_and_request(Path(workdir))
        small_vlm = VisionLanguageModel(build_tiny_model(STANDIN_DRAFTER, tiny_tokenizer()))
        drafters = {"none (target alone)": None, "ngram": NgramDrafter()}
        if small_vlm.vocab_size == engine.target.vocab_size:
            drafters["small VLM"] = VlmDrafter(small_vlm)
        print(f"Speculum demo: {what}\nprompt: {request.prompt!r}\n")
        baseline = None
        for name, drafter in drafters.items():
            engine.drafter = drafter
            result = engine.generate(
                GenerateRequest(request.prompt, request.images, SamplingParams(max_new_tokens=96), SpeculationParams())
            )
            stats = result.stats
            tokens_per_s = len(result.token_ids) / max(stats.ttft_s + stats.decode_s, 1e-9)
            print(f"--- drafter: {name}")
            print(f"text: {result.text!r}")
            print(
                f"tokens={len(result.token_ids)} target_forwards={stats.target_forwards} "
                f"draft_tokens={stats.draft_tokens} accepted={stats.accepted_tokens} "
                f"τ={stats.mean_accepted_length:.2f} tokens/s={tokens_per_s:.0f}\n"
            )
            baseline = baseline or result.token_ids
            if result.token_ids != baseline:
                print("ERROR: output differs from the target alone", file=sys.stderr)
                return 1
        print("All outputs are identical to the target decoding alone.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
