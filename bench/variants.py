"""The drafter variants the benchmark compares, each one switch apart, and the command that builds them.

All are trained against the demo target by draft_service.training with the same data, seed and
number of steps (compare at equal steps, not equal minutes: notes/feasibility.md), so the table
shows what each switch buys; and the small LLaVA assistant for HF assisted generation (`assistant`).
Usage: python -m bench.variants [--out models/bench] [--only NAME]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from speculum.paths import demo_target_dir

STEPS, SEED = 1500, 0
COMMON = ["--steps", str(STEPS), "--seed", str(SEED), "--text-samples", "150", "--image-samples", "450",
          "--eval-samples", "30", "--eval-every", str(STEPS), "--threads", "1", "--fp16", "--quiet"]


@dataclass(frozen=True)
class Variant:
    name: str
    flags: tuple[str, ...]  # training flags beyond COMMON
    tree: bool = False  # also benchmarked with candidate trees


VARIANTS = (
    # The "language-only draft" baseline: no decoupling, no compression, trained on text alone.
    Variant("eagle-text", ("--drop-visual", "--image-samples", "0", "--text-samples", "600")),
    Variant("msd", ()),  # MSD: decoupled visual positions, two-stage curriculum
    Variant("msd-flash", ("--compress",)),  # + FLASH latent compression
    Variant("msd-flash-sar4", ("--compress", "--semi-ar-k", "4"), tree=True),  # + semi-autoregressive head
)


def variant_dir(root: Path, name: str) -> Path:
    return root / name


def build(variant: Variant, root: Path, target: Path) -> None:
    out = variant_dir(root, variant.name)
    command = [sys.executable, "-m", "draft_service.training", "--target", str(target), "--out", str(out),
               "--run-dir", str(Path("runs/bench_variants") / variant.name), *COMMON, *variant.flags]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)


def build_assistant(root: Path) -> None:
    """HF assisted generation's small LLaVA: the target's recipe and tokenizer, one decoder layer."""
    command = [sys.executable, "-m", "demo_world", "build", "--preset", "assistant", "--out",
               str(variant_dir(root, "assistant")), "--run-dir", "runs/bench_variants/assistant"]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/bench"))
    parser.add_argument("--target", type=Path, default=None)
    parser.add_argument("--only", action="append", default=[], help="build just these variants (repeatable)")
    parser.add_argument("--force", action="store_true", help="rebuild variants that exist")
    args = parser.parse_args()
    target = args.target or demo_target_dir()
    for variant in VARIANTS:
        if args.only and variant.name not in args.only:
            continue
        if (variant_dir(args.out, variant.name) / "config.json").is_file() and not args.force:
            print(f"{variant.name}: exists, skipped", flush=True)
            continue
        build(variant, args.out, Path(target))
    assistant = variant_dir(args.out, "assistant")
    if (not args.only or "assistant" in args.only) and (args.force or not (assistant / "config.json").is_file()):
        build_assistant(args.out)


if __name__ == "__main__":
    main()
