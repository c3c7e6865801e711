"""The drafter benchmark (issue 4): every decoding method on held-out demo prompts, side by side.

In-process, one torch thread for every method, runs interleaved (each request runs once per method,
in a rotating order), medians. Groups: image prompts and text-only prompts, at temperature 0 and 1.
At temperature 0 every method must return the target's own tokens; the table says where one does
not. Writes Markdown, JSON and a PNG plot. Drafter variants come from `models/bench/` (built by
`python -m bench.variants`); a missing one is listed as not built.
Usage: python -m bench.drafting [--quick] [--repeats N] [--max-new-tokens N] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration
from transformers.utils import logging as hf_logging

from bench.methods import EngineMethod, HfMethod, MethodFailed, Outcome
from bench.plot import plot_speedups
from bench.variants import VARIANTS, variant_dir
from demo_world.config import FULL
from demo_world.evaluate import heldout_items
from demo_world.tasks import Kind
from demo_world.text_corpus import TEXT_KIND
from draft_service.feature.drafter import FeatureDrafter
from draft_service.ngram import NgramDrafter
from orchestrator.engine import Engine, GenerateRequest
from speculum.config import SamplingParams
from speculum.paths import demo_drafter_dir, demo_target_dir
from speculum.tree import TreeShape


@dataclass
class Cell:
    """One method on one group of requests."""

    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    taus: list[float] = field(default_factory=list)
    speedups: list[float] = field(default_factory=list)  # paired with the target alone, per request
    mismatches: int = 0  # temperature 0: answers that differ from the target's
    failure: str | None = None

    def summary(self) -> dict:
        if self.failure is not None:
            return {"failed": self.failure}
        return {
            "tau": round(statistics.mean(self.taus), 3) if self.taus else None,
            "tokens_per_s": round(statistics.median(t / s for t, s in zip(self.tokens, self.seconds)), 1),
            "speedup": round(statistics.median(self.speedups), 3),
            "runs": len(self.seconds),
            "mismatches": self.mismatches,
        }


def requests(kind: str, count: int, temperature: float, max_new_tokens: int) -> list[GenerateRequest]:
    """Held-out demo prompts: unseen scenes to describe, or held-out docstring instructions."""
    items = heldout_items(FULL, Kind.DESCRIBE.value if kind == "image" else TEXT_KIND, count)
    out = []
    for i, item in enumerate(items):
        images = []
        if item.image is not None:
            import io

            buffer = io.BytesIO()
            item.image.save(buffer, format="PNG")
            images = [buffer.getvalue()]
        sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=1000 + i)
        out.append(GenerateRequest(item.example.prompt, images, sampling))
    return out


def build_methods(engine: Engine, target_dir: Path, args: argparse.Namespace) -> tuple[list, dict[str, str]]:
    """The methods to run, and the ones that cannot be built here (name -> why)."""
    k, tree_k = args.draft_length, args.tree_depth
    tree_shape = TreeShape(*args.tree)
    shipped = FeatureDrafter.from_pretrained(demo_drafter_dir(), target_dir)
    methods = [EngineMethod("target", engine, None, k)]
    missing = {}
    if not args.quick:
        hf = LlavaForConditionalGeneration.from_pretrained(target_dir, dtype=torch.float32)
        methods.append(HfMethod("hf-target", engine, hf))
        methods.append(HfMethod("hf-prompt-lookup", engine, hf, prompt_lookup_num_tokens=k))
        assistant = variant_dir(args.variants, "assistant")
        if (assistant / "config.json").is_file():
            small = LlavaForConditionalGeneration.from_pretrained(assistant, dtype=torch.float32).eval()
            methods.append(HfMethod("hf-assisted", engine, hf, assistant_model=small))
        else:
            missing["hf-assisted"] = f"no assistant at {assistant}"
    methods.append(EngineMethod("ngram", engine, NgramDrafter(), k))
    if not args.quick:
        for variant in VARIANTS:
            path = variant_dir(args.variants, variant.name)
            if not (path / "config.json").is_file():
                missing[variant.name] = f"not built ({path})"
                continue
            drafter = FeatureDrafter.from_pretrained(path, target_dir)
            methods.append(EngineMethod(variant.name, engine, drafter, k))
            if variant.tree:
                tree_drafter = FeatureDrafter(drafter.model, drafter.facts, tree_shape)
                methods.append(EngineMethod(f"{variant.name}+tree", engine, tree_drafter, tree_k))
    methods.append(EngineMethod("shipped", engine, shipped, k))
    methods.append(EngineMethod("shipped+adaptive", engine, shipped, k, adaptive=True))  # K per round <= k
    methods.append(EngineMethod("shipped+tree", engine, FeatureDrafter(shipped.model, shipped.facts, tree_shape), tree_k))
    if args.long_draft_length:  # a semi-AR drafter drafts k tokens per pass: two passes per round
        long_k = args.long_draft_length
        methods.append(EngineMethod(f"shipped K={long_k}", engine, shipped, long_k))
        methods.append(EngineMethod(f"shipped+adaptive K<={long_k}", engine, shipped, long_k, adaptive=True))
    return methods, missing


def run_group(methods: list, group: list[GenerateRequest], repeats: int) -> dict[str, Cell]:
    cells = {m.name: Cell() for m in methods}
    for repeat in range(repeats):
        for index, request in enumerate(group):
            shift = (repeat * len(group) + index) % len(methods)
            outcomes: dict[str, Outcome] = {}
            for method in methods[shift:] + methods[:shift]:
                cell = cells[method.name]
                if cell.failure is not None:
                    continue
                try:
                    outcomes[method.name] = outcome = method.run(request)
                except MethodFailed as exc:
                    cell.failure = str(exc).splitlines()[0][:160]
                    continue
                cell.seconds.append(outcome.seconds)
                cell.tokens.append(len(outcome.token_ids))
                if outcome.tau is not None:
                    cell.taus.append(outcome.tau)
            base = outcomes["target"]
            for name, outcome in outcomes.items():
                rate, base_rate = len(outcome.token_ids) / outcome.seconds, len(base.token_ids) / base.seconds
                cells[name].speedups.append(rate / base_rate)
                if request.sampling.greedy and outcome.token_ids != base.token_ids:
                    cells[name].mismatches += 1
    return cells


def markdown(results: dict, settings: dict, missing: dict[str, str]) -> str:
    lines = [f"Measured {settings['date']} on {settings['cpus']} CPUs, 1 torch thread, K = {settings['draft_length']} "
             f"unless a row names its K (trees: depth {settings['tree_depth']}, width {settings['tree'][0]}, "
             f"{settings['tree'][1]} nodes), "
             f"max {settings['max_new_tokens']} new tokens, {settings['repeats']} repeat(s), interleaved, medians.", ""]
    for group, cells in results.items():
        lines += [f"**{group}**", "", "| method | τ | tokens/s | speedup | differs from target |", "|---|---|---|---|---|"]
        for name, row in cells.items():
            if "failed" in row:
                lines.append(f"| {name} | — | — | fails: {row['failed']} | — |")
                continue
            tau = "—" if row["tau"] is None else f"{row['tau']:.2f}"
            differs = f"{row['mismatches']}/{row['runs']}" if group.endswith("T=0") else "n/a (sampling)"
            lines.append(f"| {name} | {tau} | {row['tokens_per_s']:.0f} | {row['speedup']:.2f}× | {differs} |")
        lines.append("")
    lines += [f"Not run: {name}: {why}." for name, why in missing.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a reduced set in about a minute")
    parser.add_argument("--target", type=Path, default=None, help="target folder (default: the demo target)")
    parser.add_argument("--variants", type=Path, default=Path("models/bench"), help="drafter variants folder")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=None, help="prompts per group")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--draft-length", type=int, default=4)
    parser.add_argument("--long-draft-length", type=int, default=8,
                        help="also run the shipped drafter with this K (0: skip)")
    parser.add_argument("--tree-depth", type=int, default=5)
    parser.add_argument("--tree", type=int, nargs=2, default=(2, 6), metavar=("WIDTH", "NODES"))
    parser.add_argument("--groups", default=None,
                        help="comma-separated KIND:T groups, e.g. image:0,text:0 (default: image:0 with --quick, "
                             "else image and text at T = 0 and 1)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bench"))
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 2)
    prompts = args.prompts or (2 if args.quick else 4)
    max_new = args.max_new_tokens or (64 if args.quick else 160)
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    target_dir = args.target or demo_target_dir()
    engine = Engine.from_pretrained(target_dir)
    methods, missing = build_methods(engine, Path(target_dir), args)
    groups = [("image", 0.0)] if args.quick else [("image", 0.0), ("text", 0.0), ("image", 1.0), ("text", 1.0)]
    if args.groups:
        groups = [(kind, float(t)) for kind, t in (group.split(":") for group in args.groups.split(","))]
    engine.generate(requests("image", 1, 0.0, 8)[0])  # warm-up
    results = {}
    for kind, temperature in groups:
        name = f"{kind} prompts, T={temperature:g}"
        print(f"running {name}: {len(methods)} methods x {prompts} prompts x {repeats}", flush=True)
        cells = run_group(methods, requests(kind, prompts, temperature, max_new), repeats)
        results[name] = {method: cell.summary() for method, cell in cells.items()}
    settings = {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "draft_length": args.draft_length,
                "long_draft_length": args.long_draft_length,
                "tree_depth": args.tree_depth, "tree": list(args.tree), "max_new_tokens": max_new, "repeats": repeats,
                "prompts_per_group": prompts, "quick": args.quick, "target": str(target_dir)}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(results, settings, missing)
    (args.out_dir / "drafting.md").write_text(table)
    (args.out_dir / "drafting.json").write_text(json.dumps({"settings": settings, "results": results,
                                                            "not_run": missing}, indent=2))
    plot_speedups(results, args.out_dir / "drafting.png")
    print(table)
    print(f"wrote {args.out_dir}/drafting.md, .json, .png")


if __name__ == "__main__":
    main()
