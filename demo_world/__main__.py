"""CLI: `python -m demo_world build|evaluate|samples|speed`.

build     tokenizer -> target training (resumable from --run-dir) -> llava-hf folder at --out
evaluate  held-out accuracy of a shipped folder, per question kind
samples   write a few seeded sample scenes as PNG files
speed     greedy decode speed of a target folder (ms/token, fp32) on the sample scenes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from demo_world.config import (ASSISTANT, FULL, IMAGE_LAST, LOOKUP_PROPOSAL, MICRO, PER_ANSWER, PROBE_CELL, PROBE_ONLY,
                               TIED,
                               TIED_PER_ANSWER, RecipeConfig)
from demo_world.data import build_tokenizer, prompt_ids
from demo_world.evaluate import FACT_KINDS, evaluate, load_target
from demo_world.model import build_image_processor, build_model, save_target
from demo_world.scenes import render, scene_for_seed
from demo_world.tasks import DESCRIBE_PROMPTS
from demo_world.train import train

PRESETS = {"full": FULL, "probe-only": PROBE_ONLY, "micro": MICRO, "assistant": ASSISTANT,
           "lookup-proposal": LOOKUP_PROPOSAL, "tied": TIED, "image-last": IMAGE_LAST, "per-answer": PER_ANSWER,
           "tied-per-answer": TIED_PER_ANSWER, "probe-cell": PROBE_CELL}
SAMPLE_SEEDS = (101, 202, 303, 404, 505, 606)


def _recipe(args: argparse.Namespace) -> RecipeConfig:
    config = PRESETS[args.preset]
    if args.steps is not None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=args.steps))
    return config


def build(args: argparse.Namespace) -> None:
    config = _recipe(args)
    torch.set_num_threads(args.threads)
    began = time.monotonic()
    tokenizer = build_tokenizer(config)
    image_processor = build_image_processor(config.model)
    model = build_model(config.model, config.train.seed)

    def monitor(m, step):
        report = evaluate(m, tokenizer, image_processor, config, per_kind=16,
                          kinds=tuple(k.value for k in FACT_KINDS))
        return {s.kind: s.facts for s in report.scores}

    result = train(model, tokenizer, image_processor, config, Path(args.run_dir), monitor=monitor,
                   stop_after=args.stop_after)
    save_target(model, tokenizer, config.model, Path(args.out))
    print(json.dumps({"out": args.out, **dataclasses.asdict(result),
                      "total_seconds": round(time.monotonic() - began, 1)}))


def run_evaluate(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, tokenizer, image_processor = load_target(Path(args.model))
    config = PRESETS[args.preset]
    kinds = tuple(args.kinds.split(",")) if args.kinds else None
    report = evaluate(model, tokenizer, image_processor, config, per_kind=args.per_kind, kinds=kinds)
    for s in report.scores:
        print(f"{s.kind:12s} n={s.n:4d}  key facts {s.facts:.3f}  exact {s.exact:.3f}")
    print(f"pooled key-fact accuracy on {', '.join(k.value for k in FACT_KINDS)}: {report.fact_accuracy:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(report), indent=1))


def samples(args: argparse.Namespace) -> None:
    config = PRESETS[args.preset]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in SAMPLE_SEEDS:
        render(scene_for_seed(seed, config.scenes), config.scenes).save(out / f"scene_{seed}.png")


@torch.inference_mode()
def speed(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, tokenizer, image_processor = load_target(Path(args.model))
    config = PRESETS[args.preset]
    per_token = []
    for seed in SAMPLE_SEEDS:
        image = render(scene_for_seed(seed, config.scenes), config.scenes)
        ids = prompt_ids(tokenizer, DESCRIBE_PROMPTS[0], True, config.model.visual_tokens)
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                  "pixel_values": image_processor([image], return_tensors="pt").pixel_values}
        # Prefill alone, then the whole generation: the difference is the decode time.
        began = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - began
        began = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        total = time.perf_counter() - began
        new = out.shape[1] - len(ids)
        per_token.append((total - prefill) / max(1, new - 1))
        print(f"scene_{seed}: {new} tokens, prefill {prefill * 1000:.1f} ms, "
              f"decode {per_token[-1] * 1000:.2f} ms/token")
    per_token.sort()
    print(f"median greedy decode: {per_token[len(per_token) // 2] * 1000:.2f} ms/token "
          f"({args.threads} threads, fp32)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo_world", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the target and write it in llava-hf layout")
    b.add_argument("--out", default="models/demo/target")
    b.add_argument("--run-dir", default="runs/demo_target", help="checkpoints and the training log")
    b.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    b.add_argument("--stop-after", type=int, default=None,
                   help="stop (and export) at this LM step without changing the schedule; a rerun resumes")
    b.set_defaults(func=build)
    e = sub.add_parser("evaluate", help="held-out accuracy of a target folder")
    e.add_argument("--model", default="models/demo/target")
    e.add_argument("--per-kind", type=int, default=100)
    e.add_argument("--json", default=None, help="also write the report here")
    e.add_argument("--kinds", default=None, help="comma-separated kinds to score (default: all)")
    e.set_defaults(func=run_evaluate)
    s = sub.add_parser("samples", help="write the sample scenes as PNG files")
    s.add_argument("--out", default="models/demo/samples")
    s.set_defaults(func=samples)
    sp = sub.add_parser("speed", help="greedy decode ms/token on the sample scenes")
    sp.add_argument("--model", default="models/demo/target")
    sp.add_argument("--max-new-tokens", type=int, default=200)
    sp.set_defaults(func=speed)
    for p in (b, e, s, sp):
        p.add_argument("--preset", choices=sorted(PRESETS), default="full")
        p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
