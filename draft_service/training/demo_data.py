"""Training and held-out prompts from the demo world, turned into target features.

Image items follow the target's own training mix (without its text share); text items come from
demo_world's text-only instruction set. Held-out items use other seeds (scenes) and the held-out
docstrings (text), so the acceptance evaluation never sees a training prompt. The collector takes
items from local files (local_data.py) the same way.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from demo_world.config import FULL
from demo_world.data import Sample, make_item
from demo_world.tasks import Kind
from demo_world.text_corpus import TEXT_KIND
from draft_service.training.config import AnswerSource, DataConfig
from draft_service.training.features import FeatureSample, extract_features, greedy_answer
from orchestrator.prompting import PromptBuilder
from speculum.records import PromptInputs
from speculum.vlm import VisionLanguageModel

STORAGE_DTYPE = torch.float16  # halves the pools' memory; the objective casts features back to fp32
IMAGE_MIX = tuple((kind, weight) for kind, weight in FULL.train.mix if kind != TEXT_KIND)


@dataclass(frozen=True)
class FeaturePools:
    """train_text / train_image: the two curriculum pools · eval_text / eval_image: held-out sets."""

    train_text: list[FeatureSample]
    train_image: list[FeatureSample]
    eval_text: list[FeatureSample]
    eval_image: list[FeatureSample]


@dataclass(frozen=True)
class PoolItems:
    """The items behind each of FeaturePools' pools, before the target has seen them."""

    train_text: Sequence[Sample]
    train_image: Sequence[Sample]
    eval_text: Sequence[Sample]
    eval_image: Sequence[Sample]


def demo_items(count: int, multimodal: bool, held_out: bool, seed: int) -> list[Sample]:
    """`count` seeded demo items: image questions (describe only when held out) or text instructions."""
    rng = random.Random(f"drafter:{seed}:{'heldout' if held_out else 'train'}:{'image' if multimodal else 'text'}")
    if not multimodal:
        return [make_item(TEXT_KIND, rng, FULL.scenes, held_out) for _ in range(count)]
    kinds, weights = zip(*IMAGE_MIX)
    pick = (lambda: Kind.DESCRIBE.value) if held_out else (lambda: rng.choices(kinds, weights)[0])
    return [make_item(pick(), rng, FULL.scenes, held_out) for _ in range(count)]


def demo_pool_items(config: DataConfig, multimodal: bool) -> PoolItems:
    """Every pool drawn from the demo world (no image items for a text-only target)."""
    return PoolItems(
        train_text=demo_items(config.text_samples, False, False, config.seed),
        train_image=demo_items(config.image_samples if multimodal else 0, True, False, config.seed),
        eval_text=demo_items(config.eval_samples, False, True, config.seed),
        eval_image=demo_items(config.eval_samples if multimodal else 0, True, True, config.seed),
    )


class FeatureCollector:
    """Prompts through the target's tokenizer and image processor, answers, then target features."""

    def __init__(self, target: VisionLanguageModel, prompts: PromptBuilder, image_processor, tokenizer):
        self.target = target
        self.prompts = prompts
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    def prompt(self, item: Sample) -> PromptInputs:
        images = [] if item.image is None or not self.target.is_multimodal else [item.image]
        token_ids = self.prompts.tokenize(item.example.prompt, len(images))
        if not images:
            return PromptInputs(token_ids)
        pixels = self.image_processor(images, return_tensors="pt").pixel_values
        return PromptInputs(token_ids, pixel_values=pixels, visual_embeds=self.target.encode_images(pixels).cpu())

    def collect(self, items: Sequence[Sample], answers: AnswerSource, max_new_tokens: int, label: str) -> list[FeatureSample]:
        out, too_long = [], 0
        for item in tqdm(items, desc=f"features: {label}", unit="seq"):
            prompt = self.prompt(item)
            # Answers are cut to the target's context; a prompt that leaves no room for one is skipped.
            room = self.target.max_positions - len(self.target.expand_image_tokens(prompt.token_ids))
            if room < 2:
                too_long += 1
                continue
            if answers is AnswerSource.SELF:
                answer = greedy_answer(self.target, prompt, min(max_new_tokens, room))
            else:
                answer = self.tokenizer(" " + item.example.answer, add_special_tokens=False).input_ids
                answer = [*answer, *sorted(self.target.eos_token_ids)[:1]][:room]
            out.append(extract_features(self.target, prompt, answer, dtype=STORAGE_DTYPE))
        if too_long:
            tqdm.write(f"features: {label}: skipped {too_long} prompts longer than the target's context")
        return out

    def pools(self, config: DataConfig, items: PoolItems | None = None) -> FeaturePools:
        """Every pool of `config`, from `items` (default: the demo world's); held-out sets always hold
        the target's own answers (what it will emit)."""
        items = demo_pool_items(config, self.target.is_multimodal) if items is None else items
        return FeaturePools(
            train_text=self.collect(items.train_text, config.answers, config.max_new_tokens, "train text"),
            train_image=self.collect(items.train_image, config.answers, config.max_new_tokens, "train image"),
            eval_text=self.collect(items.eval_text, AnswerSource.SELF, config.max_new_tokens, "held-out text"),
            eval_image=self.collect(items.eval_image, AnswerSource.SELF, config.max_new_tokens, "held-out image"),
        )
