"""The training loop: seeded batches from the curriculum, the EAGLE loss, AdamW with warm-up, cosine
decay and clipping, resumable checkpoints, and held-out acceptance evaluations.

Every random choice (batch composition, feature noise) is a function of (seed, step), and the
checkpoint holds the weights, the optimizer moments and the step, so a resumed run continues the
uninterrupted one exactly. This module loads no target: it receives features.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from draft_service.feature.checkpoint import save_checkpoint
from draft_service.feature.drafter import FeatureDrafter
from draft_service.feature.model import FeatureDraftModel
from draft_service.training.config import OptimConfig
from draft_service.training.demo_data import FeaturePools
from draft_service.training.evaluate import AcceptanceReport, simulated_pipelined_tau, simulated_tau
from draft_service.training.features import FeatureSample
from draft_service.training.objective import LossWeights, feature_loss
from draft_service.training.schedule import learning_rate, multimodal_share
from speculum.model_facts import ModelFacts

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq", "step")


@dataclass(frozen=True)
class Evaluation:
    """Held-out acceptance after `step` optimizer steps, on image and text prompts; sequential, and
    pipelined (look-aheads, `simulated_pipelined_tau`) for a semi-AR drafter."""

    step: int
    image: AcceptanceReport | None
    text: AcceptanceReport | None
    image_pipelined: AcceptanceReport | None = None
    text_pipelined: AcceptanceReport | None = None


@dataclass(frozen=True)
class TrainResult:
    steps: int
    seconds: float
    last_loss: float
    last_top1: float
    evaluations: tuple[Evaluation, ...]


def step_batch(pools: FeaturePools, config: OptimConfig, step: int) -> list[FeatureSample]:
    """The sequences of optimizer step `step`: each is multimodal with the curriculum's share."""
    rng = random.Random(f"batch:{config.seed}:{step}")
    share = multimodal_share(config, step)
    batch = []
    for _ in range(config.batch_size):
        use_image = bool(pools.train_image) and (not pools.train_text or rng.random() < share)
        pool = pools.train_image if use_image else pools.train_text
        batch.append(pool[rng.randrange(len(pool))])
    return batch


def evaluate(model: FeatureDraftModel, facts: ModelFacts, pools: FeaturePools, k: int, step: int) -> Evaluation:
    was_training = model.training
    drafter = FeatureDrafter(model.eval(), facts)
    image = simulated_tau(drafter, pools.eval_image, k) if pools.eval_image else None
    text = simulated_tau(drafter, pools.eval_text, k) if pools.eval_text else None
    # Look-aheads branch for a semi-AR drafter (draft_service.feature.branches).
    ahead = model.config.semi_ar_k > 1
    image_ahead = simulated_pipelined_tau(drafter, pools.eval_image, k) if ahead and pools.eval_image else None
    text_ahead = simulated_pipelined_tau(drafter, pools.eval_text, k) if ahead and pools.eval_text else None
    model.train(was_training)
    return Evaluation(step, image, text, image_ahead, text_ahead)


class Trainer:
    """Trains `model` on `pools`; checkpoints under `run_dir/checkpoint` and resumes from there."""

    def __init__(self, model: FeatureDraftModel, facts: ModelFacts, pools: FeaturePools, config: OptimConfig,
                 run_dir: Path, progress: bool = True):
        self.model = model
        self.facts = facts
        self.pools = pools
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.weights = LossWeights(config.feature_weight, config.ce_weight, config.noise, config.lookahead_weight)
        self.step = 0

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoint"

    def save(self) -> None:
        folder = self.checkpoint_dir
        save_checkpoint(self.model, folder)
        moments = {}
        for name, param in self.params.items():
            for key, value in self.optimizer.state.get(param, {}).items():
                moments[f"{name}:{key}"] = torch.as_tensor(value).contiguous()
        save_file(moments, str(folder / OPTIMIZER_FILE))
        (folder / STATE_FILE).write_text(json.dumps({"step": self.step, "optim": asdict(self.config)}, indent=1))

    def resume(self) -> bool:
        """Continue from the checkpoint in run_dir when there is one (made with the same config)."""
        folder = self.checkpoint_dir
        if not (folder / STATE_FILE).is_file():
            return False
        state = json.loads((folder / STATE_FILE).read_text())
        saved = OptimConfig(**{**state["optim"], "betas": tuple(state["optim"]["betas"])})
        if saved != self.config:
            raise ValueError(f"{folder} was written by another training config; use a fresh --run-dir")
        self.model.load_state_dict(load_file(str(folder / "model.safetensors")))
        moments = load_file(str(folder / OPTIMIZER_FILE))
        for name, param in self.params.items():
            found = {key: moments[f"{name}:{key}"] for key in MOMENTS if f"{name}:{key}" in moments}
            if found:
                self.optimizer.state[param] = found
        self.step = state["step"]
        return True

    def train_step(self) -> tuple[float, float]:
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(config, self.step)
        noise = torch.Generator().manual_seed(config.seed * 1_000_003 + self.step)
        parts = feature_loss(self.model, self.facts, step_batch(self.pools, config, self.step), self.weights, noise)
        self.optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        torch.nn.utils.clip_grad_norm_(self.params.values(), config.grad_clip)
        self.optimizer.step()
        self.step += 1
        return parts.total.item(), parts.top1

    def run(self, stop_after: int | None = None) -> TrainResult:
        """Train to `config.steps` (or for at most `stop_after` more steps: a time-boxed session that
        a later run resumes, on the same schedule)."""
        config = self.config
        self.resume()
        limit = config.steps if stop_after is None else min(config.steps, self.step + stop_after)
        self.model.train()
        began = time.monotonic()
        loss = top1 = float("nan")
        evaluations = []
        log_path = self.run_dir / "train_log.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=config.steps, initial=self.step, desc="train drafter", unit="step", disable=not self.progress)
        with log_path.open("a") as log:
            while self.step < limit:
                loss, top1 = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", top1=f"{top1:.3f}", mm=f"{multimodal_share(config, self.step - 1):.2f}")
                record = {"step": self.step, "loss": round(loss, 5), "top1": round(top1, 4)}
                if config.eval_every and self.step % config.eval_every == 0 and self.step < config.steps:
                    evaluations.append(evaluate(self.model, self.facts, self.pools, config.eval_k, self.step))
                    record["eval"] = asdict(evaluations[-1])
                    tqdm.write(f"step {self.step}: {_summary(evaluations[-1])}")
                if self.step % 10 == 0 or "eval" in record:
                    log.write(json.dumps(record) + "\n")
                if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                    self.save()
            bar.close()
            self.save()
            evaluations.append(evaluate(self.model, self.facts, self.pools, config.eval_k, self.step))
            log.write(json.dumps({"step": self.step, "eval": asdict(evaluations[-1])}) + "\n")
        self.model.eval()
        return TrainResult(self.step, time.monotonic() - began, loss, top1, tuple(evaluations))


def _summary(evaluation: Evaluation) -> str:
    parts = [f"{name} τ@{report.k}={report.tau:.2f}" for name, report in
             (("image", evaluation.image), ("text", evaluation.text), ("image pipelined", evaluation.image_pipelined),
              ("text pipelined", evaluation.text_pipelined)) if report is not None]
    return ", ".join(parts)
