"""Baseline drafters vs the target alone, in-process, interleaved side by side in one run.

Every request runs once per method in a rotating order, one torch thread for all (DESIGN.md's
in-process method). Reports τ, median tokens/s and the paired median speedup over the target
alone, checks that every method returned the target's own tokens, and writes JSON.
Usage: python -m bench.baselines [--target DIR] [--repeats N] [--max-new-tokens N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.utils import logging as hf_logging

from draft_service.ngram import NgramDrafter
from draft_service.vlm_drafter import VlmDrafter
from orchestrator.engine import Engine, GenerateRequest
from speculum.config import SamplingParams, SpeculationParams
from speculum.tiny import STANDIN_DRAFTER, STANDIN_TARGET, build_tiny_model, save_tiny_checkpoint, tiny_tokenizer
from speculum.vlm import VisionLanguageModel

PROMPTS = ["Describe the image in detail.", "What objects are in the picture?", "Explain what you see, step by step."]


def _image(seed: int) -> bytes:
    import io

    pixels = (np.random.default_rng(seed).random((48, 48, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def run(target_dir: Path, repeats: int, max_new_tokens: int, num_draft_tokens: int) -> dict:
    engine = Engine.from_pretrained(target_dir)
    methods = {"none": None, "ngram": NgramDrafter()}
    small = VisionLanguageModel(build_tiny_model(STANDIN_DRAFTER, tiny_tokenizer()))
    if small.vocab_size == engine.target.vocab_size:
        methods["small-vlm"] = VlmDrafter(small)
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    requests = [GenerateRequest(p, [_image(i)], sampling, SpeculationParams(num_draft_tokens=num_draft_tokens))
                for i, p in enumerate(PROMPTS)]
    engine.drafter = None
    engine.generate(requests[0])  # warm-up
    rows = {name: {"seconds": [], "tokens": [], "tau": []} for name in methods}
    names = list(methods)
    for repeat in range(repeats):
        for index, request in enumerate(requests):
            order = names[(repeat + index) % len(names):] + names[: (repeat + index) % len(names)]
            outputs = {}
            for name in order:
                engine.drafter = methods[name]
                started = time.perf_counter()
                result = engine.generate(request)
                rows[name]["seconds"].append(time.perf_counter() - started)
                rows[name]["tokens"].append(len(result.token_ids))
                rows[name]["tau"].append(result.stats.mean_accepted_length)
                outputs[name] = result.token_ids
            assert len(set(outputs.values())) == 1, f"outputs differ on request {index}: lossless contract broken"
    base = rows["none"]["seconds"]
    report = {}
    for name, row in rows.items():
        report[name] = {
            "tau": statistics.mean(row["tau"]),
            "median_tokens_per_s": statistics.median(t / s for t, s in zip(row["tokens"], row["seconds"])),
            "median_speedup": statistics.median(b / s for b, s in zip(base, row["seconds"])),
            "runs": len(row["seconds"]),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, help="target folder (default: the tiny stand-in target)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--draft-length", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/baselines.json"))
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as workdir:
        target_dir = args.target or save_tiny_checkpoint(Path(workdir) / "target", STANDIN_TARGET)
        report = run(target_dir, args.repeats, args.max_new_tokens, args.draft_length)
    print(f"greedy, max_new_tokens={args.max_new_tokens}, K={args.draft_length}, 1 torch thread, "
          f"{len(PROMPTS)} image prompts x {args.repeats} repeats, interleaved")
    print(f"{'drafter':<10} {'tau':>6} {'tokens/s':>9} {'speedup':>8}")
    for name, row in report.items():
        print(f"{name:<10} {row['tau']:>6.2f} {row['median_tokens_per_s']:>9.1f} {row['median_speedup']:>7.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out), "target": str(args.target)},
                                    "results": report}, indent=2))


if __name__ == "__main__":
    main()
