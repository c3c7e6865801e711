"""Prompts and reference answers about a `Scene`, of several kinds.

Answers are worded from the scene's content (counts, colours, shapes, places), so a model that does
not look at the image cannot guess them. `key_facts` extracts the words that carry those facts, which
is what the held-out evaluation compares. This module draws nothing and knows nothing about tokens.
"""

from __future__ import annotations

import enum
import random
import re
from collections import Counter
from dataclasses import dataclass

from demo_world.scenes import COLOURS, LETTERS, SHAPES, SIZES, Scene, SceneObject

NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLACES = (
    ("in the top left corner", "at the top", "in the top right corner"),
    ("on the left", "in the centre", "on the right"),
    ("in the bottom left corner", "at the bottom", "in the bottom right corner"),
)
# Short names of the cells for "what is <place>?" questions.
PLACE_NAMES = (
    ("top left corner", "top middle", "top right corner"),
    ("middle left", "centre", "middle right"),
    ("bottom left corner", "bottom middle", "bottom right corner"),
)
DESCRIBE_PROMPTS = (
    "Describe the image in detail.",
    "Describe this image in detail.",
    "Give a detailed description of the image.",
    "What do you see in this picture? Describe it in detail.",
)


class Kind(enum.Enum):
    """Question kinds; the value is the name used in reports."""

    DESCRIBE = "describe"
    COUNT = "count"
    COUNT_SHAPE = "count_shape"
    COLOUR = "colour"  # colour of a shape that occurs once
    SHAPE = "shape"  # shape of a colour that occurs once
    SIZE = "size"
    POSITION = "position"
    AT_PLACE = "at_place"
    RELATION = "relation"
    COMPARE = "compare"
    LETTER = "letter"


@dataclass(frozen=True)
class Example:
    """One prompt with its reference answer (no image or chat markup)."""

    kind: str
    prompt: str
    answer: str


def plural(noun: str, n: int) -> str:
    return noun if n == 1 else noun + "s"


def there_is(n: int, noun: str) -> str:
    """'there is one circle' / 'there are two circles' / 'there are no circles'."""
    verb = "is" if n == 1 else "are"
    return f"there {verb} {NUMBERS[n]} {plural(noun, n)}"


def name(obj: SceneObject) -> str:
    return f"{obj.colour} {obj.shape}"


def place(row: int, col: int) -> str:
    return PLACES[row][col]


def _and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def describe(scene: Scene) -> str:
    """A long description: every object in reading order, then totals by shape, colour and size."""
    objs = scene.objects
    n = len(objs)
    parts = [f"The image shows {NUMBERS[n]} {plural('object', n)} on a light grey background."]
    for i, obj in enumerate(objs):
        where = place(obj.row, obj.col)
        # Two sentence shapes, chosen by the object itself, so the wording also depends on the image.
        if obj.size == "large":
            parts.append(f"{where.capitalize()} there is a large {name(obj)}.")
        else:
            parts.append(f"There is a small {name(obj)} {where}.")
    shapes = Counter(o.shape for o in objs)
    parts.append(_and_list([there_is(shapes[s], s) for s in SHAPES]).capitalize() + ".")
    colours = Counter(o.colour for o in objs)
    used = [c for c in COLOURS if colours[c]]
    if len(used) == 1:
        parts.append(f"All of the objects are {used[0]}." if n > 1 else f"The only colour is {used[0]}.")
    else:
        parts.append("The colours are " + _and_list([f"{NUMBERS[colours[c]]} {c}" for c in used]) + ".")
    large = sum(o.size == "large" for o in objs)
    if n == 1:
        parts.append(f"It is {objs[0].size}.")
    elif large in (0, n):
        parts.append(f"All of them are {'large' if large else 'small'}.")
    else:
        parts.append(f"{NUMBERS[large].capitalize()} of them {'is' if large == 1 else 'are'} large"
                     f" and {NUMBERS[n - large]} {'is' if n - large == 1 else 'are'} small.")
    if scene.letter is not None:
        parts.append(f"The letter {scene.letter.char} is written {place(scene.letter.row, scene.letter.col)}.")
    else:
        parts.append("There is no writing in the image.")
    return " ".join(parts)


def _unique(objs: tuple[SceneObject, ...], attr: str) -> list[SceneObject]:
    counts = Counter(getattr(o, attr) for o in objs)
    return [o for o in objs if counts[getattr(o, attr)] == 1]


def _unique_named(objs: tuple[SceneObject, ...]) -> list[SceneObject]:
    counts = Counter(name(o) for o in objs)
    return [o for o in objs if counts[name(o)] == 1]


def make_example(kind: Kind, scene: Scene, rng: random.Random) -> Example | None:
    """A question of `kind` about `scene`, or None when the scene cannot support it."""
    objs = scene.objects
    if kind is Kind.DESCRIBE:
        return Example(kind.value, rng.choice(DESCRIBE_PROMPTS), describe(scene))
    if kind is Kind.COUNT:
        prompt = rng.choice(("How many objects are there?", "How many objects are in the image?",
                             "Count the objects in the image."))
        return Example(kind.value, prompt, there_is(len(objs), "object").capitalize() + ".")
    if kind is Kind.COUNT_SHAPE:
        shape = rng.choice(SHAPES)
        n = sum(o.shape == shape for o in objs)
        return Example(kind.value, f"How many {shape}s are there?", there_is(n, shape).capitalize() + ".")
    if kind is Kind.COLOUR:
        candidates = _unique(objs, "shape")
        if not candidates:
            return None
        obj = rng.choice(candidates)
        return Example(kind.value, f"What colour is the {obj.shape}?", f"The {obj.shape} is {obj.colour}.")
    if kind is Kind.SHAPE:
        candidates = _unique(objs, "colour")
        if not candidates:
            return None
        obj = rng.choice(candidates)
        prompt = rng.choice((f"What shape is the {obj.colour} object?", f"Which shape is {obj.colour}?"))
        return Example(kind.value, prompt, f"The {obj.colour} object is a {obj.shape}.")
    if kind is Kind.SIZE:
        candidates = _unique_named(objs)
        if not candidates:
            return None
        obj = rng.choice(candidates)
        return Example(kind.value, f"Is the {name(obj)} large or small?", f"The {name(obj)} is {obj.size}.")
    if kind is Kind.POSITION:
        candidates = _unique_named(objs)
        if not candidates:
            return None
        obj = rng.choice(candidates)
        return Example(kind.value, f"Where is the {name(obj)}?", f"The {name(obj)} is {place(obj.row, obj.col)}.")
    if kind is Kind.AT_PLACE:
        row, col = rng.randrange(3), rng.randrange(3)
        where = place(row, col)
        hit = [o for o in objs if (o.row, o.col) == (row, col)]
        if hit:
            answer = f"{where.capitalize()} there is a {hit[0].size} {name(hit[0])}."
        else:
            answer = f"There is no object {where}."
        return Example(kind.value, f"What is in the {PLACE_NAMES[row][col]}?", answer)
    if kind is Kind.RELATION:
        candidates = _unique_named(objs)
        if len(candidates) < 2:
            return None
        a, b = rng.sample(candidates, 2)
        prompt = f"Is the {name(a)} to the left of the {name(b)}?"
        if a.col < b.col:
            answer = f"Yes, the {name(a)} is to the left of the {name(b)}."
        elif a.col > b.col:
            answer = f"No, the {name(a)} is to the right of the {name(b)}."
        else:
            above = "above" if a.row < b.row else "below"
            answer = f"No, the {name(a)} is {above} the {name(b)}."
        return Example(kind.value, prompt, answer)
    if kind is Kind.COMPARE:
        s1, s2 = rng.sample(SHAPES, 2)
        n1, n2 = (sum(o.shape == s for o in objs) for s in (s1, s2))
        verdict = "Yes" if n1 > n2 else "No"
        return Example(kind.value, f"Are there more {s1}s than {s2}s?",
                       f"{verdict}, {there_is(n1, s1)} and {there_is(n2, s2)}.")
    if kind is Kind.LETTER:
        prompt = rng.choice(("What letter is written in the image?", "Read the letter in the image."))
        if scene.letter is None:
            return Example(kind.value, prompt, "There is no letter in the image.")
        where = place(scene.letter.row, scene.letter.col)
        return Example(kind.value, prompt, f"The letter {scene.letter.char} is written {where}.")
    raise AssertionError(f"unhandled kind {kind}")


FACT_WORDS = frozenset(
    NUMBERS + SHAPES + tuple(s + "s" for s in SHAPES) + tuple(COLOURS) + SIZES
    + ("yes", "top", "bottom", "left", "right", "centre", "above", "below", "corner")
)


def key_facts(answer: str) -> tuple[str, ...]:
    """The fact-bearing words of an answer, in order: numbers, shapes, colours, sizes, places, yes/no
    and written letters. Two answers state the same facts when these sequences are equal."""
    facts = []
    for word in re.findall(r"[A-Za-z]+", answer):
        if len(word) == 1 and word in LETTERS and word != "A":
            facts.append(word)  # a written letter ("A" is excluded: it is also the article)
        elif word.lower() in FACT_WORDS:
            facts.append(word.lower())
    return tuple(facts)
