"""Held-out accuracy of a demo target: greedy answers to unseen scenes, compared by key facts.

Held-out scenes come from seeds in their own namespace ("heldout:..."), and held-out text items from
docstrings never used in training. The prompt path is the engine's (chat template, `<image>`
expanded), so what is measured is what `speculum generate` will answer. Does not train.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from demo_world.config import RecipeConfig
from demo_world.data import Sample, make_item, prompt_ids
from demo_world.tasks import Kind, key_facts
from demo_world.text_corpus import TEXT_KIND

# The kinds the ">= 90%" aim is about: counts and attributes (shape, colour, size, place).
FACT_KINDS = (Kind.COUNT, Kind.COUNT_SHAPE, Kind.COLOUR, Kind.SHAPE, Kind.SIZE, Kind.POSITION)


@dataclass(frozen=True)
class KindScore:
    """Accuracy on one question kind."""

    kind: str
    n: int
    facts: float  # share of answers whose key facts equal the reference's
    exact: float  # share of answers equal to the reference string


@dataclass(frozen=True)
class EvalReport:
    """Per-kind scores and the pooled key-fact accuracy over `FACT_KINDS`."""

    scores: tuple[KindScore, ...]
    fact_accuracy: float


def heldout_items(config: RecipeConfig, kind: str, n: int) -> list[Sample]:
    """`n` held-out items of `kind`; the same for every model and every run."""
    rng = random.Random(f"heldout:{kind}")
    return [make_item(kind, rng, config.scenes, held_out=True) for _ in range(n)]


@torch.inference_mode()
def greedy_answer(model, tokenizer, image_processor, item: Sample, visual_tokens: int, max_new_tokens: int) -> str:
    """The model's greedy answer to `item`, decoded without special tokens and the leading space."""
    ids = prompt_ids(tokenizer, item.example.prompt, item.image is not None, visual_tokens)
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if item.image is not None:  # an explicit pixel_values=None makes generate() run the vision tower
        inputs["pixel_values"] = image_processor([item.image], return_tensors="pt").pixel_values
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def evaluate(model, tokenizer, image_processor, config: RecipeConfig, per_kind: int,
             kinds: tuple[str, ...] | None = None) -> EvalReport:
    """Score `model` on `per_kind` held-out items of each kind (all kinds by default)."""
    kinds = kinds or tuple(k.value for k in Kind) + (TEXT_KIND,)
    scores = []
    for kind in kinds:
        facts = exact = 0
        long_answer = kind in (Kind.DESCRIBE.value, TEXT_KIND)
        for item in heldout_items(config, kind, per_kind):
            answer = greedy_answer(model, tokenizer, image_processor, item, config.model.visual_tokens,
                                   200 if long_answer else 32)
            exact += answer == item.example.answer
            facts += key_facts(answer) == key_facts(item.example.answer)
        scores.append(KindScore(kind, per_kind, facts / per_kind, exact / per_kind))
    pooled = [s for s in scores if s.kind in {k.value for k in FACT_KINDS}]
    fact_accuracy = sum(s.facts * s.n for s in pooled) / max(1, sum(s.n for s in pooled))
    return EvalReport(tuple(scores), fact_accuracy)


def load_target(path: Path):
    """(model in fp32, tokenizer, image processor) from a shipped folder, as the engine loads it."""
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    return model, tokenizer, processor.image_processor
