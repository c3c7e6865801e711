"""The seeded, resumable training loop of the demo target.

Reproducibility rules: batches come from `data.step_items(config, step)`, the learning rate is a
function of the step, and a checkpoint (model, optimiser, scheduler, RNG state) is written every
`checkpoint_every` steps, so a run killed and resumed ends with the same weights as one that was
not (on the same machine type and thread count). This module does not decide sizes or export.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerBase

from demo_world.config import RecipeConfig, TrainConfig
from demo_world.data import IGNORE, Batch, collate, step_items, vision_batch
from demo_world.scenes import GRID, PATCH_COLOURS, PATCH_SHAPES, PATCH_SIZES

CHECKPOINT = "checkpoint.pt"
VISION_CHECKPOINT = "vision_checkpoint.pt"
LOG = "train_log.jsonl"


@dataclass(frozen=True)
class TrainResult:
    """What a (possibly resumed) run did."""

    steps: int
    resumed_from: int
    final_loss_ema: float
    seconds: float  # wall time of this invocation only


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup, cosine from 1 to `min_lr_ratio` at `config.steps`, then held at that floor."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


PROBE_CLASSES = (PATCH_SHAPES, PATCH_COLOURS, PATCH_SIZES)  # the classes of the probe's three heads
UNTIED_CLASSES = frozenset({"none"})  # classes with no word in the questions keep their own weight row


def probe_class_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[tuple[int | None, ...], ...]:
    """Per probe head, the token id of each class's word as it appears in a question (" triangle"),
    or None for a class that keeps its own weights. Raises ValueError if a word is not one token."""
    heads = []
    for classes in PROBE_CLASSES:
        ids = []
        for name in classes:
            if name in UNTIED_CLASSES:
                ids.append(None)
                continue
            tokens = tokenizer(" " + name, add_special_tokens=False).input_ids
            if len(tokens) != 1:
                raise ValueError(f"cannot tie the probe: {name!r} is {len(tokens)} tokens")
            ids.append(tokens[0])
        heads.append(tuple(ids))
    return tuple(heads)


class PatchProbe(nn.Module):
    """Training-only linear heads on the projector's output: the shape, colour and size class of what
    covers each patch. The LM loss reaches the vision tower only weakly (shape recognition stalled
    without this); these give it a direct gradient. Never shipped: the export is the plain LLaVA.

    With `class_tokens` (see `probe_class_tokens`) the weight row of each named class is the LM's input
    embedding of its word times a learned scale, so the loss aligns patch features with word embeddings."""

    def __init__(self, hidden: int, seed: int, class_tokens: tuple[tuple[int | None, ...], ...] | None = None,
                 cell: bool = False) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # seeded, and the global RNG stream is left as it was
            torch.manual_seed(seed)
            self.shape = nn.Linear(hidden, len(PATCH_SHAPES))
            self.colour = nn.Linear(hidden, len(PATCH_COLOURS))
            self.size = nn.Linear(hidden, len(PATCH_SIZES))
            # which of the 3x3 grid's cells the patch lies in (TrainConfig.probe_cell)
            self.cell = nn.Linear(hidden, GRID * GRID) if cell else None
        self.tied = class_tokens is not None
        if self.tied:
            assert [len(t) for t in class_tokens] == [len(c) for c in PROBE_CLASSES], class_tokens
            for i, ids in enumerate(class_tokens):
                self.register_buffer(f"token_ids{i}", torch.tensor([t or 0 for t in ids]))
                self.register_buffer(f"is_tied{i}", torch.tensor([t is not None for t in ids]))
            self.log_scale = nn.Parameter(torch.zeros(()))

    def loss(self, features: torch.Tensor, labels: torch.Tensor, embeddings: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Mean of the three per-patch cross-entropies. features [I, N, D], labels [I, N, 3];
        `embeddings` [V, D] (the LM's input embeddings) is required when the probe is tied."""
        assert features.shape[:2] == labels.shape[:2], (features.shape, labels.shape)
        assert embeddings is not None or not self.tied, "a tied probe needs the input embeddings"
        flat, targets = features.reshape(-1, features.shape[-1]), labels.reshape(-1, 3)
        heads = (self.shape, self.colour, self.size)
        total = 0.0
        for i, head in enumerate(heads):
            weight = head.weight  # [classes, D]
            if self.tied:
                tied_rows = self.log_scale.exp() * embeddings[getattr(self, f"token_ids{i}")]
                weight = torch.where(getattr(self, f"is_tied{i}")[:, None], tied_rows, weight)
            total = total + F.cross_entropy(F.linear(flat, weight, head.bias), targets[:, i])
        if self.cell is None:
            return total / len(heads)
        cells = patch_cells(features.shape[1]).repeat(features.shape[0])
        return (total + F.cross_entropy(self.cell(flat), cells)) / (len(heads) + 1)


def patch_cells(num_patches: int) -> torch.Tensor:
    """[N] the grid cell (row-major, 0..8) holding each patch's centre, patches in row-major order."""
    side = round(num_patches ** 0.5)
    centre = (torch.arange(side) + 0.5) / side  # in fractions of the image
    band = (centre * GRID).long().clamp_max(GRID - 1)
    return (band[:, None] * GRID + band[None, :]).flatten()


def make_optimizer(model: LlavaForConditionalGeneration, config: TrainConfig, probe: nn.Module | None = None
                   ) -> torch.optim.AdamW:
    """AdamW with two groups: the vision side (tower + projector, and the probe) has its own peak learning rate."""
    vision = _vision_parameters(model) + (list(probe.parameters()) if probe is not None else [])
    vision_ids = {id(p) for p in vision}
    text = [p for p in model.parameters() if id(p) not in vision_ids]
    return torch.optim.AdamW(
        [{"params": vision, "lr": config.vision_lr}, {"params": text, "lr": config.lr}],
        betas=(0.9, 0.95),
        weight_decay=config.weight_decay,
    )


def answer_loss(model: LlavaForConditionalGeneration, batch: Batch, probe: PatchProbe | None = None,
                probe_weight: float = 0.0, per_answer: bool = False, lookup_weight: float = 0.0,
                lookup_layer: int = 2) -> torch.Tensor:
    """Mean cross-entropy over answer tokens, or with `per_answer` the mean over examples of each answer's
    token mean (plus `probe_weight` x the probe's patch loss, if the batch has images). The LM head runs
    only on answer positions: with a 1.5k vocabulary it would otherwise cost more than a decoder layer."""
    captured = []
    use_probe = probe is not None and probe_weight > 0 and batch.patch_labels is not None
    hook = (model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: captured.append(out))
            if use_probe else None)
    attention_inputs = []
    use_lookup = lookup_weight > 0 and batch.lookup is not None and bool(batch.lookup.any())
    attention = model.model.language_model.layers[lookup_layer].self_attn if use_lookup else None
    lookup_hook = (attention.register_forward_hook(
        lambda _m, _a, kwargs, _out: attention_inputs.append((kwargs["hidden_states"], kwargs["position_embeddings"])),
        with_kwargs=True) if use_lookup else None)
    try:
        hidden = model.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
        ).last_hidden_state  # [B, T, D]
    finally:
        for h in (hook, lookup_hook):
            if h is not None:
                h.remove()
    targets = batch.labels[:, 1:]  # [B, T-1]
    keep = targets != IGNORE
    logits = model.lm_head(hidden[:, :-1][keep])  # [answer tokens, V]
    if per_answer:
        token_loss = F.cross_entropy(logits, targets[keep], reduction="none")  # [answer tokens]
        row = keep.nonzero()[:, 0]  # the example of each answer token
        sums = torch.zeros(len(targets), dtype=token_loss.dtype).index_add(0, row, token_loss)
        counts = keep.sum(1)
        loss = (sums[counts > 0] / counts[counts > 0]).mean()
    else:
        loss = F.cross_entropy(logits, targets[keep])
    if use_probe:
        embeddings = model.get_input_embeddings().weight if probe.tied else None
        loss = loss + probe_weight * probe.loss(captured[0], batch.patch_labels, embeddings)
    if use_lookup:
        loss = loss + lookup_weight * lookup_loss(attention, *attention_inputs[0], batch, model.config.image_token_id)
    return loss


def lookup_loss(attention: nn.Module, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                batch: Batch, image_token_id: int) -> torch.Tensor:
    """-log of head 0's attention mass on the named object's patches, averaged over the rows that predict
    an answer token of the examples whose question names one object. hidden [B, T, D]: the attention's
    input (after the layer's norm); the head is recomputed from its q/k weights, with RoPE and the
    causal and padding masks, as the layer runs it."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim = attention.head_dim
    query = F.linear(hidden, attention.q_proj.weight[:head_dim])[:, None]  # [B, 1, T, hd]
    key = F.linear(hidden, attention.k_proj.weight[:head_dim])[:, None]
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    scores = (query @ key.transpose(-1, -2))[:, 0] * head_dim ** -0.5  # [B, T, T]
    length = hidden.shape[1]
    visible = torch.ones(length, length, dtype=torch.bool).tril()[None] & batch.attention_mask[:, None, :].bool()
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    # per row of the batch, the key positions of the named object's patches (the i-th image is the
    # i-th row that has image tokens; its n-th image token is patch n)
    targets = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
    image_rows = (batch.input_ids == image_token_id).any(1).nonzero().flatten()
    for image, row in enumerate(image_rows.tolist()):
        slots = (batch.input_ids[row] == image_token_id).nonzero().flatten()
        targets[row, slots] = batch.lookup[image]
    named = targets.any(1)
    queries = (batch.labels[:, 1:] != IGNORE) & named[:, None]  # rows that predict an answer token
    mass = (probs[:, :-1] * targets[:, None, :]).sum(-1)  # [B, T-1]
    return -torch.log(mass[queries].clamp_min(1e-6)).mean()


def _vision_parameters(model: LlavaForConditionalGeneration) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.startswith(("model.vision_tower", "model.multi_modal_projector"))]


def image_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """The projector's output, as the decoder receives it: [I, N, D]."""
    out = model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=model.config.vision_feature_layer,
                                         vision_feature_select_strategy=model.config.vision_feature_select_strategy)
    return torch.stack(list(out.pooler_output))


def pretrain_vision(model: LlavaForConditionalGeneration, probe: PatchProbe, image_processor, config: RecipeConfig,
                    run_dir: Path) -> None:
    """Phase 1: train the vision tower, projector and probe on the patch labels alone for
    `vision_steps` steps. Resumable from its own checkpoint; once finished, it only reloads the result."""
    tc = config.train
    if tc.vision_steps == 0:
        return
    # A tied probe's class rows are input embeddings: phase 1 trains them with the probe.
    embeddings = model.get_input_embeddings().weight if probe.tied else None
    params = _vision_parameters(model) + list(probe.parameters()) + ([embeddings] if probe.tied else [])
    optimizer = torch.optim.AdamW(params, lr=tc.vision_pretrain_lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
    schedule = dataclasses.replace(tc, steps=tc.vision_steps, warmup_steps=min(50, tc.vision_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, schedule))
    checkpoint, start = run_dir / VISION_CHECKPOINT, 0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
    if start >= tc.vision_steps:
        return
    model.train()
    loss_ema = float("nan")
    with open(run_dir / LOG, "a") as log, tqdm(total=tc.vision_steps, initial=start, desc="pre-train vision",
                                               unit="step") as bar:
        for step in range(start, tc.vision_steps):
            pixels, labels = vision_batch(config, step, image_processor)
            loss = probe.loss(image_features(model, pixels), labels, embeddings)
            value = _optimize(loss, params, optimizer, scheduler, tc.grad_clip)
            loss_ema = _ema(loss_ema, value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.3f}")
            done = step + 1
            log.write(json.dumps({"vision_step": done, "loss": round(value, 5), "lr": scheduler.get_last_lr()[0]}) + "\n")
            log.flush()
            if done % tc.checkpoint_every == 0 or done == tc.vision_steps:
                state = {"step": done, "model": model.state_dict(), "probe": probe.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
                tmp = checkpoint.with_suffix(".tmp")
                torch.save(state, tmp)
                os.replace(tmp, checkpoint)


def _save_checkpoint(path: Path, model, probe, optimizer, scheduler, step: int, loss_ema: float) -> None:
    state = {
        "step": step,
        "model": model.state_dict(),
        "probe": probe.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "loss_ema": loss_ema,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-save leaves the previous checkpoint intact


def train(
    model: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    image_processor,
    config: RecipeConfig,
    run_dir: Path,
    monitor=None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train `model` in place: the vision phase (`pretrain_vision`), then `config.train.total_steps` LM
    steps; resumes from `run_dir` if a checkpoint is there.

    `monitor(model, step) -> dict`, if given, runs every `monitor_every` steps; its result is only logged.
    `stop_after` ends the run early at that step (as if killed after a checkpoint) without changing
    the schedule, which is what a resumed run must continue.
    """
    tc = config.train
    run_dir.mkdir(parents=True, exist_ok=True)
    probe = PatchProbe(config.model.text_hidden, tc.seed + 1, probe_class_tokens(tokenizer) if tc.probe_tied else None,
                       cell=tc.probe_cell)
    checkpoint = run_dir / CHECKPOINT
    if not checkpoint.exists():
        pretrain_vision(model, probe, image_processor, config, run_dir)
    optimizer = make_optimizer(model, tc, probe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, tc))
    start, loss_ema = 0, float("nan")
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start, loss_ema = state["step"], state["loss_ema"]
    began = time.monotonic()
    model.train()
    with open(run_dir / LOG, "a") as log, tqdm(total=tc.total_steps, initial=start, desc="train target", unit="step") as bar:
        for step in range(start, min(tc.total_steps, stop_after or tc.total_steps)):
            batch = collate(step_items(config, step), tokenizer, image_processor, config.model.visual_tokens,
                            config.scenes if tc.probe_weight > 0 or tc.lookup_weight > 0 else None)
            loss = answer_loss(model, batch, probe, tc.probe_weight, tc.loss_per_answer, tc.lookup_weight, tc.lookup_layer)
            value = _optimize(loss, model.parameters(), optimizer, scheduler, tc.grad_clip)
            loss_ema = _ema(loss_ema, value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.3f}")
            done = step + 1
            record = {"step": done, "loss": round(value, 5), "loss_ema": round(loss_ema, 5),
                      "lr": scheduler.get_last_lr()[1], "time": round(time.monotonic() - began, 2),
                      "tokens": int(batch.attention_mask.sum())}
            if monitor is not None and tc.monitor_every and done % tc.monitor_every == 0:
                model.eval()
                record["monitor"] = monitor(model, done)
                model.train()
                tqdm.write(f"step {done}: {record['monitor']}")
            log.write(json.dumps(record) + "\n")
            log.flush()
            if done % tc.checkpoint_every == 0 or done in (tc.total_steps, stop_after):
                _save_checkpoint(checkpoint, model, probe, optimizer, scheduler, done, loss_ema)
    model.eval()
    return TrainResult(min(tc.total_steps, stop_after or tc.total_steps), start, loss_ema, time.monotonic() - began)


def _optimize(loss: torch.Tensor, params, optimizer, scheduler, grad_clip: float) -> float:
    """One optimizer step on `loss` (clipped), then the schedule's; returns the loss value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.item()


def _ema(previous: float, value: float) -> float:
    """The smoothed loss shown on the progress bar (NaN before the first step)."""
    return value if math.isnan(previous) else 0.98 * previous + 0.02 * value
