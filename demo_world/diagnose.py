"""Diagnosis of a demo target's wrong answers (issue 3): what it answered instead, and where the facts
it needs are still linearly readable inside the model.

Two measurements, both on held-out scenes:
- `failure_anatomy`: greedy answers to lookup questions (colour / size / position / count of a shape),
  each wrong one labelled by whose attribute it reported (another object's? none in the scene?).
- `probe_table`: linear probes on the features the decoder sees (`proj`) and on the decoder's hidden
  states at the visual positions (`dec1`..), for every object's shape, colour, size and grid cell.
  Near-perfect probes mean the facts are there and the decoder fails to retrieve them.

Analysis only: it never trains or changes the target, and nothing in the recipe imports it.
Run: `python -m demo_world.diagnose anatomy|probes --model models/demo/target`.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from demo_world.config import FULL, RecipeConfig
from demo_world.data import prompt_ids
from demo_world.evaluate import greedy_answer, heldout_items, load_target
from demo_world.scenes import (COLOURS, MIN_COVER, SHAPES, SIZES, SUPERSAMPLE, Scene, SceneConfig, _draw, render,
                               scene_for_seed)
from demo_world.tasks import NUMBERS, PLACES, Kind, key_facts

LOOKUP_KINDS = (Kind.COLOUR, Kind.SIZE, Kind.POSITION, Kind.COUNT_SHAPE)
ATTRIBUTES = ("shape", "colour", "size", "cell")
_PLACE_CELLS = sorted(((p, (r, c)) for r, row in enumerate(PLACES) for c, p in enumerate(row)),
                      key=lambda t: -len(t[0]))


def patch_owners(scene: Scene, config: SceneConfig, patch_size: int) -> tuple[int, ...]:
    """Index into `scene.objects` of the object covering each patch (row-major), or -1 for background
    and the letter. Same coverage rule as `scenes.patch_labels`, so probes and the recipe's labels agree."""
    letter_id = len(scene.objects) + 1
    mask = _draw(scene, config, "L", 0, lambda i, _obj: i + 1, letter_id)
    side, grid, width, pixels = patch_size * SUPERSAMPLE, config.image_size // patch_size, mask.width, mask.tobytes()
    owners = []
    for row in range(grid):
        for col in range(grid):
            counts = Counter()
            for y in range(row * side, (row + 1) * side):
                counts.update(pixels[y * width + col * side:y * width + (col + 1) * side])
            owner = max(range(1, letter_id + 1), key=lambda v: counts[v])
            covered = counts[owner] >= MIN_COVER * side * side
            owners.append(owner - 1 if covered and owner != letter_id else -1)
    return tuple(owners)


@dataclass(frozen=True)
class AnswerRecord:
    """One held-out lookup question, the model's answer, and whose fact a wrong answer reported."""

    kind: str
    prompt: str
    reference: str
    answer: str
    correct: bool
    objects: int  # objects in the scene
    failure: str  # "" when correct, else a label from `classify_failure`


def _asked_object(kind: Kind, scene: Scene, prompt: str):
    if kind is Kind.COLOUR:
        shape = re.search(r"the (\w+)\?", prompt).group(1)
        return next(o for o in scene.objects if o.shape == shape)
    colour, shape = re.search(r"the (\w+) (\w+)", prompt).groups()
    return next(o for o in scene.objects if (o.colour, o.shape) == (colour, shape))


def answer_place(answer: str) -> tuple[int, int] | None:
    """The grid cell an answer names, if any (longest place phrase first: 'at the top' is in none other)."""
    return next((cell for phrase, cell in _PLACE_CELLS if phrase in answer), None)


def classify_failure(kind: Kind, scene: Scene, prompt: str, answer: str) -> str:
    """Whose fact a wrong answer reports: 'another object' (the attribute of a different object in the
    scene), 'not in scene', or for counts 'count of another shape' / 'other count'."""
    facts = key_facts(answer)
    if kind is Kind.COUNT_SHAPE:
        shape = re.search(r"many (\w+)s", prompt).group(1)
        said = next((NUMBERS.index(w) for w in facts if w in NUMBERS), None)
        others = {sum(o.shape == s for o in scene.objects) for s in SHAPES if s != shape}
        return "count of another shape" if said in others else "other count"
    asked = _asked_object(kind, scene, prompt)
    others = [o for o in scene.objects if o is not asked]
    if kind is Kind.POSITION:
        cell = answer_place(answer)
        if cell is None:
            return "no place"
        return "another object" if any((o.row, o.col) == cell for o in others) else "not in scene"
    vocabulary = tuple(COLOURS) if kind is Kind.COLOUR else SIZES
    said = next((w for w in facts if w in vocabulary), None)
    attr = "colour" if kind is Kind.COLOUR else "size"
    return "another object" if any(getattr(o, attr) == said for o in others) else "not in scene"


def failure_anatomy(model, tokenizer, image_processor, config: RecipeConfig, per_kind: int,
                    kinds: tuple[Kind, ...] = LOOKUP_KINDS) -> list[AnswerRecord]:
    """Greedy answers to `per_kind` held-out items of each kind (the evaluation's items), labelled."""
    records = []
    for kind in kinds:
        for item in heldout_items(config, kind.value, per_kind):
            answer = greedy_answer(model, tokenizer, image_processor, item, config.model.visual_tokens, 32)
            correct = key_facts(answer) == key_facts(item.example.answer)
            failure = "" if correct else classify_failure(kind, item.scene, item.example.prompt, answer)
            records.append(AnswerRecord(kind.value, item.example.prompt, item.example.answer, answer, correct,
                                        len(item.scene.objects), failure))
    return records


@torch.inference_mode()
def visual_states(model, tokenizer, image_processor, config: RecipeConfig,
                  scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Per layer, the states at the N visual positions: 'proj' (the projector's output, what the decoder
    reads) and 'dec1'.. (the decoder layers' outputs). Each [I, N, D]. The prompt does not matter:
    the image comes first and attention is causal."""
    pixels = image_processor([render(s, config.scenes) for s in scenes], return_tensors="pt").pixel_values
    ids = prompt_ids(tokenizer, "Describe the image in detail.", True, config.model.visual_tokens)
    first = ids.index(model.config.image_token_index)
    hidden = model.model(input_ids=torch.tensor([ids] * len(scenes)), pixel_values=pixels,
                         output_hidden_states=True).hidden_states
    span = slice(first, first + config.model.visual_tokens)
    return {"proj" if layer == 0 else f"dec{layer}": h[:, span] for layer, h in enumerate(hidden)}


@dataclass(frozen=True)
class ObjectSet:
    """Mean state over each object's patches, per layer ([O, D]), with the object's attributes as class ids."""

    features: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]  # attribute -> [O]


def object_set(model, tokenizer, image_processor, config: RecipeConfig, scenes: list[Scene],
               batch: int = 50) -> ObjectSet:
    """Features and labels of every object (that covers at least one patch) in `scenes`."""
    patch_size = config.model.image_size // round(config.model.visual_tokens ** 0.5)
    features: dict[str, list[torch.Tensor]] = {}
    labels: dict[str, list[int]] = {a: [] for a in ATTRIBUTES}
    for start in range(0, len(scenes), batch):
        chunk = scenes[start:start + batch]
        states = visual_states(model, tokenizer, image_processor, config, chunk)
        for i, scene in enumerate(chunk):
            owners = patch_owners(scene, config.scenes, patch_size)
            for index, obj in enumerate(scene.objects):
                patches = [p for p, owner in enumerate(owners) if owner == index]
                if not patches:
                    continue
                for layer, h in states.items():
                    features.setdefault(layer, []).append(h[i, patches].mean(0))
                for attr, value in zip(ATTRIBUTES, (SHAPES.index(obj.shape), tuple(COLOURS).index(obj.colour),
                                                    SIZES.index(obj.size), obj.row * 3 + obj.col)):
                    labels[attr].append(value)
    return ObjectSet({k: torch.stack(v) for k, v in features.items()},
                     {k: torch.tensor(v) for k, v in labels.items()})


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                          l2: float = 1e-3, max_iter: int = 300) -> float:
    """Test accuracy of an L2-regularised multinomial logistic regression fitted with L-BFGS.
    train_x [M, D], train_y [M]; features are standardised on the training set."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(head(train_x), train_y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return (head(test_x).argmax(1) == test_y).float().mean().item()


def probe_table(model, tokenizer, image_processor, config: RecipeConfig, train_scenes: int = 1200,
                test_scenes: int = 400) -> dict[str, dict[str, float]]:
    """layer -> attribute -> held-out probe accuracy; probes fit on training-distribution scenes and are
    tested on scenes from the held-out seed namespace."""
    def scenes(tag: str, n: int) -> list[Scene]:
        rng = random.Random(tag)
        return [scene_for_seed(rng.getrandbits(63), config.scenes) for _ in range(n)]

    train = object_set(model, tokenizer, image_processor, config, scenes("probe-train", train_scenes))
    test = object_set(model, tokenizer, image_processor, config, scenes("heldout:probe", test_scenes))
    return {layer: {a: linear_probe_accuracy(train.features[layer], train.labels[a],
                                             test.features[layer], test.labels[a])
                    for a in ATTRIBUTES}
            for layer in train.features}


def _summarise(records: list[AnswerRecord]) -> dict:
    out = {}
    for kind in dict.fromkeys(r.kind for r in records):
        rows = [r for r in records if r.kind == kind]
        by_objects = {}
        for n in sorted({r.objects for r in rows}):
            with_n = [r.correct for r in rows if r.objects == n]
            by_objects[n] = round(sum(with_n) / len(with_n), 2)
        out[kind] = {"accuracy": sum(r.correct for r in rows) / len(rows),
                     "failures": dict(Counter(r.failure for r in rows if not r.correct)),
                     "accuracy_by_object_count": by_objects}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo_world.diagnose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("anatomy", "probes"))
    parser.add_argument("--model", default="models/demo/target")
    parser.add_argument("--per-kind", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the full result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer, image_processor = load_target(Path(args.model))
    if args.what == "anatomy":
        records = failure_anatomy(model, tokenizer, image_processor, FULL, args.per_kind)
        result = {"summary": _summarise(records), "records": [asdict(r) for r in records]}
        print(json.dumps(result["summary"], indent=1))
    else:
        result = probe_table(model, tokenizer, image_processor, FULL)
        print("layer  " + "  ".join(f"{a:>6s}" for a in ATTRIBUTES))
        for layer, row in result.items():
            print(f"{layer:6s} " + "  ".join(f"{row[a]:6.3f}" for a in ATTRIBUTES))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
