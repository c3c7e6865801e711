"""From seeds to token batches: the training mix, the tokenizer corpus, and the exact sequence layout
the engine uses at inference.

Layout (what `apply_chat_template` renders, then the engine's expansion of `<image>` into N ids):
`<s>USER: <image>×N\\n{prompt}\\nASSISTANT:` + ` {answer}</s>`; loss on the answer and `</s>` only.
Batches are a pure function of (seed, step), which is what makes resumed training reproduce the
uninterrupted run. This module does not build or train models.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from demo_world.config import RecipeConfig
from demo_world.scenes import (COLOURS, PATCH_COLOURS, PATCH_SHAPES, SHAPES, PatchLabels, Scene, SceneConfig,
                               patch_labels, render, scene_for_seed)
from demo_world.tasks import Example, Kind, make_example
from demo_world.text_corpus import TEXT_KIND, make_text_example, split_docstrings
from speculum.chat_tokenizer import IMAGE, train_chat_tokenizer

IGNORE = -100  # label value that cross-entropy skips


@dataclass(frozen=True)
class Sample:
    """One training or evaluation item: an example and, unless text-only, its image and scene."""

    example: Example
    image: Image.Image | None
    scene: Scene | None = None


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids with labels; `pixel_values` holds the images of the rows that have one."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE outside answers
    pixel_values: torch.Tensor | None  # [num_images, 3, H, W]
    # Training-only targets of the auxiliary vision heads: shape, colour and size class per patch.
    patch_labels: torch.Tensor | None = None  # [num_images, N, 3]
    # Training-only: per image, the patches of the object(s) its question names (`lookup_patches`).
    lookup: torch.Tensor | None = None  # [num_images, N] bool


def sample_item(rng: random.Random, config: RecipeConfig, held_out: bool = False) -> Sample:
    """Draw one item of the training mix from `rng`."""
    kinds, weights = zip(*config.train.mix)
    kind = rng.choices(kinds, weights)[0]
    return make_item(kind, rng, config.scenes, held_out)


def make_item(kind: str, rng: random.Random, scenes: SceneConfig, held_out: bool = False) -> Sample:
    """An item of `kind`; for image kinds the scene comes from a fresh 63-bit seed drawn from `rng`."""
    if kind == TEXT_KIND:
        return Sample(make_text_example(rng.choice(split_docstrings(held_out)), rng), None)
    while True:  # some scenes cannot support a question (e.g. no shape occurs once): draw another
        scene = scene_for_seed(rng.getrandbits(63), scenes)
        example = make_example(Kind(kind), scene, rng)
        if example is not None:
            return Sample(example, render(scene, scenes), scene)


def step_items(config: RecipeConfig, step: int) -> list[Sample]:
    """The batch of training step `step`, independent of every other step."""
    rng = random.Random(f"train:{config.train.seed}:{step}")
    return [sample_item(rng, config) for _ in range(config.train.batch_size)]


def vision_batch(config: RecipeConfig, step: int, image_processor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step` of the vision pre-training phase: (pixel_values [I, 3, H, W], patch labels [I, N, 3])."""
    rng = random.Random(f"vision:{config.train.seed}:{step}")
    scenes = [scene_for_seed(rng.getrandbits(63), config.scenes) for _ in range(config.train.vision_batch_size)]
    pixels = image_processor([render(s, config.scenes) for s in scenes], return_tensors="pt").pixel_values
    patch_size = config.scenes.image_size // round(config.model.visual_tokens ** 0.5)
    labels = [patch_labels(s, config.scenes, patch_size) for s in scenes]
    return pixels, torch.tensor([list(zip(p.shape, p.colour, p.size)) for p in labels])


def tokenizer_texts(config: RecipeConfig) -> Iterator[str]:
    """The tokenizer's training corpus: prompts and answers of every kind, and the docstrings."""
    rng = random.Random(f"tokenizer:{config.train.seed}")
    for _ in range(config.train.tokenizer_scenes):
        for kind, _weight in config.train.mix:
            if kind != TEXT_KIND:
                example = make_item(kind, rng, config.scenes).example
                yield f"USER: {example.prompt}\nASSISTANT: {example.answer}"
    for doc in split_docstrings(held_out=False):
        yield f"USER: What does {doc.qualname} do in Python?\nASSISTANT: {doc.text}"


def build_tokenizer(config: RecipeConfig) -> PreTrainedTokenizerBase:
    """Train the byte-level BPE chat tokenizer on `tokenizer_texts`."""
    return train_chat_tokenizer(tokenizer_texts(config), config.model.vocab_size, config.model.image_last)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, has_image: bool, visual_tokens: int) -> list[int]:
    """Prompt ids exactly as the engine builds them: chat template, then `<image>` expanded N times."""
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": prompt}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False).input_ids
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    out: list[int] = []
    for token in ids:
        out.extend([image_id] * visual_tokens if token == image_id else [token])
    return out


def answer_ids(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """The answer as generated after `ASSISTANT:` (leading space), closed by `</s>`."""
    return tokenizer(" " + answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]


def collate(items: list[Sample], tokenizer: PreTrainedTokenizerBase, image_processor, visual_tokens: int,
            scenes: SceneConfig | None = None) -> Batch:
    """Tokenise, right-pad and label `items`; images go through the shipped image processor.
    With `scenes`, also the per-patch labels of every image (for the auxiliary vision loss)."""
    rows, labels = [], []
    for item in items:
        prompt = prompt_ids(tokenizer, item.example.prompt, item.image is not None, visual_tokens)
        answer = answer_ids(tokenizer, item.example.answer)
        rows.append(prompt + answer)
        labels.append([IGNORE] * len(prompt) + answer)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    label_ids = torch.tensor([r + [IGNORE] * (width - len(r)) for r in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    images = [item.image for item in items if item.image is not None]
    pixels = image_processor(images, return_tensors="pt").pixel_values if images else None
    patches = None
    if scenes is not None and images:
        patch_size = scenes.image_size // round(visual_tokens ** 0.5)
        with_image = [item for item in items if item.image is not None]
        per_image = [patch_labels(item.scene, scenes, patch_size) for item in with_image]
        patches = torch.tensor([list(zip(p.shape, p.colour, p.size)) for p in per_image])
        lookup = torch.tensor([lookup_patches(item.example.prompt, p) for item, p in zip(with_image, per_image)])
        return Batch(input_ids, mask, label_ids, pixels, patches, lookup)
    return Batch(input_ids, mask, label_ids, pixels, patches)


def lookup_patches(prompt: str, labels: PatchLabels) -> list[bool]:
    """Per patch, whether it shows the object the prompt looks up: every patch of the named shape and
    colour ("the red circle", "the triangle", "the red object", "How many squares"). All False when the
    prompt names no object, or two (a relation, a comparison)."""
    words = re.findall(r"[a-z]+", prompt.lower())
    shapes = {word.removesuffix("s") for word in words if word.removesuffix("s") in SHAPES}
    colours = {word for word in words if word in COLOURS}
    if len(shapes) > 1 or len(colours) > 1 or not (shapes or colours):
        return [False] * len(labels.shape)
    return [(not shapes or PATCH_SHAPES[shape] in shapes) and (not colours or PATCH_COLOURS[colour] in colours)
            for shape, colour in zip(labels.shape, labels.colour)]
