"""Seeded 2D scenes: coloured shapes on a 3x3 grid plus an optional written letter, drawn with Pillow.

A scene is plain data (`Scene`); `render` is a pure function of it, so the same seed always gives the
same pixels. This module knows nothing about prompts or models.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 92, 220),
    "yellow": (238, 200, 20),
    "purple": (148, 64, 190),
    "orange": (250, 127, 14),
}
SIZES = ("small", "large")
LETTERS = "ABEFHKMRTXZ"  # capitals that look different from each other and from the shapes
GRID = 3
BACKGROUND = (236, 236, 236)
# Drawn at this multiple of the final size, then downsampled: anti-aliased edges carry the shape
# information that a hard-edged 12 px object on 8 px patches loses.
SUPERSAMPLE = 4
# Object radius as a fraction of a grid cell. The feasibility run's small objects (0.24 of a cell,
# about 10 px) were the ones whose shapes the ViT failed to tell apart, so both sizes are larger.
RADIUS = {"small": 0.31, "large": 0.44}
JITTER = 0.05  # max centre offset, fraction of a cell; keeps objects inside their cells


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are sampled and drawn."""

    image_size: int = 64  # pixels per side of the rendered image
    min_objects: int = 1
    max_objects: int = 5  # at most GRID*GRID - 1 so a letter can still fit
    letter_prob: float = 0.3  # chance that an empty cell holds a written capital letter

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= GRID * GRID - 1:
            raise ValueError("need 1 <= min_objects <= max_objects <= 8")
        if self.image_size < 32:
            raise ValueError("image_size must be at least 32")
        if not 0.0 <= self.letter_prob <= 1.0:
            raise ValueError("letter_prob must be in [0, 1]")


@dataclass(frozen=True)
class SceneObject:
    """One shape in one grid cell; `dx`/`dy` are the seeded jitter in fractions of a cell."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    dx: float
    dy: float


@dataclass(frozen=True)
class Letter:
    """A capital letter written in an otherwise empty grid cell."""

    char: str
    row: int
    col: int


@dataclass(frozen=True)
class Scene:
    """Objects sorted in reading order (row-major), and at most one letter."""

    objects: tuple[SceneObject, ...]
    letter: Letter | None


def sample_scene(rng: random.Random, config: SceneConfig) -> Scene:
    """Draw a scene from `rng`; consumes the same number of draws for the same outcomes."""
    n = rng.randint(config.min_objects, config.max_objects)
    cells = rng.sample(range(GRID * GRID), n + 1)  # the extra cell is where a letter may go
    objects = []
    for cell in sorted(cells[:n]):
        objects.append(
            SceneObject(
                shape=rng.choice(SHAPES),
                colour=rng.choice(tuple(COLOURS)),
                size=rng.choice(SIZES),
                row=cell // GRID,
                col=cell % GRID,
                dx=rng.uniform(-JITTER, JITTER),
                dy=rng.uniform(-JITTER, JITTER),
            )
        )
    letter = None
    if rng.random() < config.letter_prob:
        letter = Letter(char=rng.choice(LETTERS), row=cells[n] // GRID, col=cells[n] % GRID)
    return Scene(objects=tuple(objects), letter=letter)


def scene_for_seed(seed: int, config: SceneConfig) -> Scene:
    """The scene identified by `seed` (independent of any other scene)."""
    return sample_scene(random.Random(seed), config)


@lru_cache(maxsize=4)
def _font(pixels: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=pixels)


def _draw(scene: Scene, config: SceneConfig, mode: str, background, fill_of, letter_fill) -> Image.Image:
    """Draw `scene` supersampled; `fill_of(index, obj)` gives each object's fill, `letter_fill` the letter's."""
    big = config.image_size * SUPERSAMPLE
    cell = big / GRID
    image = Image.new(mode, (big, big), background)
    draw = ImageDraw.Draw(image)
    for index, obj in enumerate(scene.objects):
        cx = (obj.col + 0.5 + obj.dx) * cell
        cy = (obj.row + 0.5 + obj.dy) * cell
        r = RADIUS[obj.size] * cell
        fill = fill_of(index, obj)
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.shape == "square":
            half = r * 0.86  # a square of about the circle's area, so size does not give shape away
            draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    if scene.letter is not None:
        cx = (scene.letter.col + 0.5) * cell
        cy = (scene.letter.row + 0.5) * cell
        draw.text((cx, cy), scene.letter.char, fill=letter_fill, font=_font(int(cell * 0.8)), anchor="mm",
                  stroke_width=max(1, int(cell * 0.05)), stroke_fill=letter_fill)
    return image


def render(scene: Scene, config: SceneConfig) -> Image.Image:
    """Draw `scene` as an RGB image of `config.image_size` pixels per side."""
    image = _draw(scene, config, "RGB", BACKGROUND, lambda _i, obj: COLOURS[obj.colour], (20, 20, 20))
    return image.resize((config.image_size, config.image_size), Image.Resampling.BOX)


# Per-patch label classes (0 = nothing covers the patch enough). A letter counts as its own "shape".
PATCH_SHAPES = ("none",) + SHAPES + ("letter",)
PATCH_COLOURS = ("none",) + tuple(COLOURS)
PATCH_SIZES = ("none",) + SIZES
MIN_COVER = 0.15  # share of a patch an object must cover to be that patch's label


@dataclass(frozen=True)
class PatchLabels:
    """Class ids per patch in row-major order (the order of the vision tower's patch tokens)."""

    shape: tuple[int, ...]  # index into PATCH_SHAPES
    colour: tuple[int, ...]  # index into PATCH_COLOURS
    size: tuple[int, ...]  # index into PATCH_SIZES


def patch_labels(scene: Scene, config: SceneConfig, patch_size: int) -> PatchLabels:
    """What covers each `patch_size` patch of the rendered image: the object (or letter) with the largest
    area in it, if that area is at least `MIN_COVER` of the patch. Exact, since the scene is known."""
    letter_id = len(scene.objects) + 1
    mask = _draw(scene, config, "L", 0, lambda i, _obj: i + 1, letter_id)
    side = patch_size * SUPERSAMPLE
    grid = config.image_size // patch_size
    pixels = mask.tobytes()
    width = mask.width
    shape, colour, size = [], [], []
    for row in range(grid):
        for col in range(grid):
            counts = [0] * (letter_id + 1)
            for y in range(row * side, (row + 1) * side):
                for value in pixels[y * width + col * side:y * width + (col + 1) * side]:
                    counts[value] += 1
            owner = max(range(1, letter_id + 1), key=counts.__getitem__)
            if counts[owner] < MIN_COVER * side * side:
                shape.append(0), colour.append(0), size.append(0)
            elif owner == letter_id:
                shape.append(len(PATCH_SHAPES) - 1), colour.append(0), size.append(0)
            else:
                obj = scene.objects[owner - 1]
                shape.append(PATCH_SHAPES.index(obj.shape))
                colour.append(PATCH_COLOURS.index(obj.colour))
                size.append(PATCH_SIZES.index(obj.size))
    return PatchLabels(tuple(shape), tuple(colour), tuple(size))
