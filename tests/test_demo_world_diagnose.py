"""demo_world.diagnose: patch ownership agrees with the recipe's patch labels, wrong answers are
attributed to the right culprit on hand-built scenes, and the linear probe separates what is separable."""

from __future__ import annotations

import pytest
import torch

from demo_world.config import FULL
from demo_world.diagnose import answer_place, classify_failure, linear_probe_accuracy, patch_owners
from demo_world.scenes import PATCH_SHAPES, Letter, Scene, SceneObject, patch_labels, scene_for_seed
from demo_world.tasks import Kind

SCENE = Scene(
    objects=(
        SceneObject("circle", "red", "large", 0, 0, 0.0, 0.0),
        SceneObject("triangle", "green", "small", 0, 2, 0.0, 0.0),
        SceneObject("square", "blue", "small", 1, 2, 0.0, 0.0),
        SceneObject("triangle", "blue", "large", 2, 1, 0.0, 0.0),
    ),
    letter=Letter("K", 2, 2),
)


@pytest.mark.parametrize("seed", range(5))
def test_patch_owners_agree_with_patch_labels(seed):
    scene = scene_for_seed(seed, FULL.scenes)
    owners = patch_owners(scene, FULL.scenes, 8)
    labels = patch_labels(scene, FULL.scenes, 8)
    assert len(owners) == len(labels.shape) == 64
    for owner, shape in zip(owners, labels.shape):
        if owner < 0:
            assert PATCH_SHAPES[shape] in ("none", "letter")
        else:
            assert PATCH_SHAPES[shape] == scene.objects[owner].shape


@pytest.mark.parametrize(
    "kind, prompt, answer, expected",
    [
        (Kind.COLOUR, "What colour is the circle?", "The circle is blue.", "another object"),
        (Kind.COLOUR, "What colour is the circle?", "The circle is yellow.", "not in scene"),
        (Kind.SIZE, "Is the blue square large or small?", "The blue square is large.", "another object"),
        (Kind.POSITION, "Where is the red circle?", "The red circle is on the right.", "another object"),
        (Kind.POSITION, "Where is the red circle?", "The red circle is in the centre.", "not in scene"),
        (Kind.POSITION, "Where is the red circle?", "The red circle is here.", "no place"),
        (Kind.COUNT_SHAPE, "How many squares are there?", "There are two squares.", "count of another shape"),
        (Kind.COUNT_SHAPE, "How many squares are there?", "There are three squares.", "other count"),
    ],
)
def test_classify_failure_names_the_culprit(kind, prompt, answer, expected):
    assert classify_failure(kind, SCENE, prompt, answer) == expected


def test_answer_place_prefers_the_longest_phrase():
    assert answer_place("The x is in the top left corner.") == (0, 0)
    assert answer_place("The x is at the top.") == (0, 1)
    assert answer_place("The x is in the centre.") == (1, 1)
    assert answer_place("No place.") is None


def test_linear_probe_separates_separable_classes_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=generator)
    y = (x[:, 3] > 0).long() + 2 * (x[:, 7] > 0).long()  # 4 classes, linearly separable
    assert linear_probe_accuracy(x[:300], y[:300], x[300:], y[300:]) > 0.9
    noise = torch.randint(0, 4, (400,), generator=generator)
    assert linear_probe_accuracy(x[:300], noise[:300], x[300:], noise[300:]) < 0.45
