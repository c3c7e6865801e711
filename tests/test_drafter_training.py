"""A micro-scale run of the drafter training pipeline on a tiny target: features from demo-world
prompts, the curriculum, checkpoints, resumption, the held-out evaluation and the CLI's output."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from draft_service.feature.drafter import FeatureDrafter
from draft_service.training.__main__ import main
from draft_service.training.config import OptimConfig
from draft_service.training.schedule import learning_rate, multimodal_share
from draft_service.training.trainer import step_batch

TINY_RUN = ["--steps", "6", "--batch-size", "4", "--text-samples", "3", "--image-samples", "3",
            "--eval-samples", "2", "--max-new-tokens", "12", "--heads", "4", "--kv-heads", "2",
            "--intermediate", "64", "--checkpoint-every", "3", "--eval-every", "3", "--warmup-steps", "2",
            "--semi-ar-k", "2", "--compress", "--latents", "4", "--quiet", "--threads", "2"]


def test_schedule_and_curriculum():
    config = OptimConfig(steps=100, warmup_steps=10, text_only_fraction=0.3, lr=1e-3)
    assert learning_rate(config, 0) == pytest.approx(1e-4) and learning_rate(config, 9) == pytest.approx(1e-3)
    assert learning_rate(config, 99) == pytest.approx(1e-4, rel=0.05)
    shares = [multimodal_share(config, step) for step in range(100)]
    assert shares[:30] == [0.0] * 30 and shares[-1] == 1.0
    assert all(a <= b for a, b in zip(shares, shares[1:]))


def test_micro_training_run_and_resume(tmp_path, llava_dir, llava_engine):
    out, run_dir = tmp_path / "drafter", tmp_path / "run"
    summary = main(["--target", str(llava_dir), "--out", str(out), "--run-dir", str(run_dir), "--seed", "1", *TINY_RUN])
    assert summary["steps"] == 6 and summary["pools"] == {"train_text": 3, "train_image": 3, "eval_text": 2, "eval_image": 2}
    assert summary["heldout"]["image"]["tau"] >= 1.0
    drafter = FeatureDrafter.from_pretrained(out, llava_dir)
    assert drafter.model.config.compress_visual and drafter.model.config.semi_ar_k == 2
    assert json.loads((out / "config.json").read_text())["meta"]["seed"] == 1
    again = main(["--target", str(llava_dir), "--out", str(out), "--run-dir", str(run_dir), "--seed", "1", *TINY_RUN,
                  "--eval-only"])
    assert again["heldout"]["image"] == summary["heldout"]["image"]  # the shipped weights measure the same
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert any("eval" in record for record in log)

    # A run interrupted at step 3 and resumed reproduces the uninterrupted one (batches, noise, moments).
    resumed = tmp_path / "resumed"
    common = ["--target", str(llava_dir), "--out", str(resumed), "--run-dir", str(tmp_path / "resumed.run"), "--seed", "1"]
    (tmp_path / "resumed.run").mkdir()
    shutil.copy(run_dir / "features.safetensors", tmp_path / "resumed.run")  # the same data, not collected again
    main([*common, *TINY_RUN, "--stop-after", "3"])
    assert json.loads((tmp_path / "resumed.run" / "checkpoint" / "state.json").read_text())["step"] == 3
    main([*common, *TINY_RUN])
    full, cont = load_file(str(out / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert full.keys() == cont.keys()
    for name in full:
        torch.testing.assert_close(full[name], cont[name], atol=1e-5, rtol=1e-4)


def test_language_only_run_trains_without_the_image_rows(tmp_path, llava_dir):
    """--drop-visual (the language-only baseline) trains and evaluates on image data too."""
    flags = list(TINY_RUN)
    flags.remove("--compress")
    del flags[flags.index("--latents") : flags.index("--latents") + 2]
    summary = main(["--target", str(llava_dir), "--out", str(tmp_path / "drafter"), "--run-dir", str(tmp_path / "run"),
                    "--seed", "1", *flags, "--drop-visual", "--stop-after", "3"])
    config = FeatureDrafter.from_pretrained(tmp_path / "drafter", llava_dir).model.config
    assert config.drop_visual and not config.decouple_visual and not config.compress_visual
    assert summary["heldout"]["image"]["tau"] >= 1.0


def test_batches_are_a_function_of_seed_and_step(tmp_path):
    from draft_service.training.demo_data import FeaturePools

    pools = FeaturePools(list(range(5)), list(range(100, 105)), [], [])
    config = OptimConfig(steps=10, batch_size=8, text_only_fraction=0.5)
    assert step_batch(pools, config, 7) == step_batch(pools, config, 7)
    assert all(item < 100 for item in step_batch(pools, config, 0))  # stage 1: text only
    assert all(item >= 100 for item in step_batch(pools, config, 9))  # end of stage 2: all multimodal


def test_a_retrained_target_invalidates_cached_features_and_checkpoint(tmp_path, llava_dir):
    """Same config, other weights (a target trained further): the run dir's features and checkpoint
    belong to the old target and must not be reused."""
    from safetensors.torch import save_file

    target = tmp_path / "target"
    shutil.copytree(llava_dir, target)
    run_dir = tmp_path / "run"
    common = ["--target", str(target), "--out", str(tmp_path / "drafter"), "--run-dir", str(run_dir), "--seed", "1"]
    main([*common, *TINY_RUN, "--stop-after", "3"])
    before = (run_dir / "features.safetensors").read_bytes()
    weights = load_file(str(target / "model.safetensors"))
    name = next(n for n in weights if "lm_head" in n or "embed_tokens" in n)
    weights[name] = weights[name] * 1.5  # "trained further": same config, other weights
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    summary = main([*common, *TINY_RUN])
    assert (run_dir / "features.safetensors").read_bytes() != before  # collected again from the new target
    assert summary["steps"] == 6
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in log if "step" in record and "loss" in record]
    assert steps.count(min(steps)) >= 2, "the second run must start again from its first step"


def test_lookahead_weight_trains_other_weights_and_reports_pipelined_tau(tmp_path, llava_dir):
    """--lookahead-weight adds the look-ahead term (same data and seed, other weights); for a semi-AR
    drafter the evaluation also simulates the pipelined loop (whose look-aheads are tested with a
    fitted drafter in test_lookahead_training)."""
    runs = {}
    for weight in ("0", "1.0"):
        runs[weight] = main(["--target", str(llava_dir), "--out", str(tmp_path / f"drafter{weight}"),
                             "--run-dir", str(tmp_path / f"run{weight}"), "--seed", "1", *TINY_RUN, "--eval-k", "2",
                             "--stop-after", "3", "--lookahead-weight", weight])
        if not (tmp_path / "run1.0").exists():  # the same data: collect the features once
            (tmp_path / "run1.0").mkdir()
            shutil.copy(tmp_path / "run0" / "features.safetensors", tmp_path / "run1.0")
    plain, ahead = (load_file(str(tmp_path / f"drafter{w}" / "model.safetensors")) for w in ("0", "1.0"))
    assert any(not torch.equal(plain[name], ahead[name]) for name in plain)
    for summary in runs.values():
        pipelined = summary["heldout"]["image_pipelined"]
        assert pipelined is not None and pipelined["emitted"] == summary["heldout"]["image"]["emitted"]
