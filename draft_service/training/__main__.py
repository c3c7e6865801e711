"""CLI: `python -m draft_service.training --target DIR --out DIR --steps N --seed S ...`.

Collects the target's features on demo-world prompts (cached in --run-dir), trains a feature
drafter with the MSD curriculum, evaluates held-out acceptance and writes the drafter checkpoint
to --out (its config records the target folder relative to --out, the command, seed and timings).

Training data: by default the demo world generates both modalities. `--text-jsonl FILE`
(ShareGPT-style JSONL) replaces the demo text items, `--llava-json FILE --image-folder DIR`
(LLaVA-style JSON, image paths relative to DIR) the demo image items. Of each file, --eval-samples
records (a seeded draw) are held out for the acceptance evaluation; the others train, or at most
--text-samples / --image-samples of them. The first human turn is the prompt (through the target's
chat template), the next gpt turn the dataset answer, used with `--answers dataset`; with the
default `--answers self` the target answers the file's prompts itself. `--image-samples 0` trains
a text-only drafter (with `--drop-visual`, image positions are left out of its context when it
serves: the "language-only draft" baseline); its held-out evaluation still reports image τ. Formats and errors: draft_service/training/local_data.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoTokenizer

from draft_service.feature.checkpoint import load_checkpoint, new_model, save_checkpoint
from draft_service.feature.target_parts import load_target_parts, target_ref
from draft_service.training.config import AnswerSource, DataConfig, LocalFiles, OptimConfig
from draft_service.training.demo_data import FeatureCollector
from draft_service.training.feature_store import load_pools, save_pools
from draft_service.training.local_data import pool_items, read_local, train_count
from draft_service.training.trainer import Trainer, evaluate
from orchestrator.prompting import PromptBuilder
from speculum.errors import InvalidArgument
from speculum.vlm import VisionLanguageModel


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m draft_service.training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="the target folder (llava-hf layout)")
    p.add_argument("--out", required=True, help="where to write the drafter checkpoint")
    p.add_argument("--run-dir", default=None, help="features cache, resumable checkpoint, log (default: OUT.run)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--text-only-fraction", type=float, default=0.3, help="MSD stage 1 share of the steps")
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--lookahead-weight", type=float, default=0.0,
                   help="weight of the loss on rows fed the drafter's own features, as pipelined look-aheads feed "
                        "them (0: off; a second forward per step)")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--eval-k", type=int, default=4)
    p.add_argument("--text-samples", type=int, default=None,
                   help=f"training text items (default: {DataConfig.text_samples} demo items, or every record of "
                        "--text-jsonl not held out; a file caps it)")
    p.add_argument("--image-samples", type=int, default=None,
                   help=f"training image items (default: {DataConfig.image_samples} demo items, or every record of "
                        "--llava-json not held out; 0: a text-only drafter)")
    p.add_argument("--eval-samples", type=int, default=DataConfig.eval_samples,
                   help="held-out items per modality (demo items, or records split off each file)")
    p.add_argument("--text-jsonl", type=Path, default=None, help="ShareGPT-style JSONL replacing the demo text items")
    p.add_argument("--llava-json", type=Path, default=None, help="LLaVA-style JSON replacing the demo image items")
    p.add_argument("--image-folder", type=Path, default=None, help="the folder of --llava-json's (relative) image paths")
    p.add_argument("--answers", choices=[a.value for a in AnswerSource], default=AnswerSource.SELF.value)
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--no-decouple", action="store_true", help="fuse visual positions like text (no MSD)")
    p.add_argument("--compress", action="store_true", help="FLASH latent compression of visual positions")
    p.add_argument("--drop-visual", action="store_true",
                   help="leave image positions out of the drafter's context (language-only draft; implies --no-decouple)")
    p.add_argument("--latents", type=int, default=8, help="C latents per image when compressing")
    p.add_argument("--semi-ar-k", type=int, default=1, help="features predicted per drafter forward")
    p.add_argument("--stop-after", type=int, default=None, help="train at most this many steps now (resume later)")
    p.add_argument("--fp16", action="store_true", help="store the final weights in fp16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--eval-only", action="store_true", help="only measure held-out τ of the drafter at --out")
    return p.parse_args(argv)


def weights_sha256(target_dir: Path) -> str:
    """One hash over the target's safetensors files (names and bytes), in name order."""
    digest = hashlib.sha256()
    for path in sorted(Path(target_dir).glob("*.safetensors")):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> dict:
    """Run the CLI; a malformed data file ends it with `error: <file:line>: <what is wrong>`."""
    args = parse_args(argv)
    try:
        return run(args, argv)
    except InvalidArgument as err:
        raise SystemExit(f"error: {err}") from None


def run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    torch.set_num_threads(args.threads)
    began = time.monotonic()
    target_dir, out = Path(args.target), Path(args.out)
    run_dir = Path(args.run_dir) if args.run_dir else out.with_name(out.name + ".run")
    try:
        local = read_local(LocalFiles(args.text_jsonl, args.llava_json, args.image_folder))
    except ValueError as err:  # --llava-json without --image-folder or the reverse
        raise SystemExit(f"error: {err}") from None
    text_samples = train_count(args.text_samples, local.text, args.eval_samples, DataConfig.text_samples)
    image_samples = train_count(args.image_samples, local.image, args.eval_samples, DataConfig.image_samples)
    data = DataConfig(text_samples, image_samples, args.eval_samples, AnswerSource(args.answers),
                      args.max_new_tokens, args.seed)
    optim = OptimConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                        text_only_fraction=args.text_only_fraction, noise=args.noise,
                        lookahead_weight=args.lookahead_weight,
                        checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, eval_k=args.eval_k,
                        seed=args.seed)
    ref = target_ref(target_dir, os.path.relpath(target_dir.resolve(), out.resolve()))

    target = VisionLanguageModel.from_pretrained(target_dir, torch.device("cpu"))
    files = local.fingerprint()
    # The weights too: a target retrained with the same config must not reuse features of the old one.
    key = {"data": dataclasses.asdict(data), "target": ref.config_sha256, "weights": weights_sha256(target_dir),
           **({"files": files} if files else {})}
    store_key = json.dumps(key, default=str)
    pools = load_pools(run_dir / "features.safetensors", store_key)
    if pools is None and (run_dir / "checkpoint").exists():
        print(f"{run_dir}/checkpoint was trained on other features: starting from step 0", flush=True)
        shutil.rmtree(run_dir / "checkpoint")
    if pools is None:
        tokenizer = AutoTokenizer.from_pretrained(target_dir, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(target_dir, local_files_only=True) if target.is_multimodal else None
        collector = FeatureCollector(target, PromptBuilder(tokenizer, target.image_token_id), processor, tokenizer)
        pools = collector.pools(data, pool_items(data, local, target.is_multimodal))
        save_pools(pools, run_dir / "features.safetensors", store_key)
    features_s = time.monotonic() - began

    if args.eval_only:
        evaluation = evaluate(load_checkpoint(out, target_dir), target.facts, pools, args.eval_k, step=-1)
        summary = {"drafter": str(out), "heldout": dataclasses.asdict(evaluation)}
        print(json.dumps(summary))
        return summary
    model = new_model(ref, load_target_parts(target_dir), seed=args.seed, num_heads=args.heads,
                      num_kv_heads=args.kv_heads, intermediate_size=args.intermediate,
                      decouple_visual=not (args.no_decouple or args.drop_visual), compress_visual=args.compress,
                      drop_visual=args.drop_visual,
                      num_latents=args.latents, semi_ar_k=args.semi_ar_k)
    result = Trainer(model, target.facts, pools, optim, run_dir, progress=not args.quiet).run(args.stop_after)
    final = result.evaluations[-1]
    summary = {
        "command": "python -m draft_service.training " + shlex.join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "steps": result.steps,
        "features_seconds": round(features_s, 1),
        "train_seconds": round(result.seconds, 1),
        "total_seconds": round(time.monotonic() - began, 1),
        "last_loss": round(result.last_loss, 4),
        "heldout": dataclasses.asdict(final),
        "pools": {name: len(getattr(pools, name)) for name in ("train_text", "train_image", "eval_text", "eval_image")},
        **({"data_files": files} if files else {}),
    }
    save_checkpoint(model, out, torch.float16 if args.fp16 else torch.float32, extra=summary)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
