"""Scenes of the synthetic sets: constants, shapes and glyphs, rendering with PIL, random scene layout.

A scene is drawn in RGB (:func:`render_scene`, what the model sees) or as per-pixel class ids
(:func:`label_map`, the trainer's patch targets); both go through the same drawing code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

# --------------------------------------------------------------------------- constants

IMAGE_SIZE = 96
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 195, 60),
    "blue": (45, 95, 240),
    "yellow": (240, 220, 30),
    "purple": (165, 55, 210),
}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles",
          "shape": "shapes", "object": "objects"}
# Glyphs for the OCR subtask: visually distinct upper-case letters and digits.
LETTERS = tuple("ABCDEFHKLMPRTX")
DIGITS = tuple("234579")
GLYPH_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "light": (200, 200, 200),
    **{k: COLORS[k] for k in ("yellow", "green", "red")},
}
BACKGROUNDS = ((0, 0, 0), (28, 28, 28), (45, 40, 50))

# MME folder names as in MME_Benchmark_release_version (note the upper-case OCR).
MME_SUBTASKS = ("existence", "count", "position", "color", "OCR")
# Question families of the GQA-style set (``types.detailed``).
GQA_FAMILIES = ("existence", "shape", "count", "position", "color", "ocr")
MME_SUFFIX = "Please answer yes or no."

DEFAULT_MAX_OBJECTS = 4
MAX_COUNT = 6  # largest number that may appear in a count question
MME_SEED = 2024
GQA_SEED = 2025
POPE_SEED = 2026
VALIDATION_SEED = 77

SMALL_RADIUS = (4, 6)   # half-extent in pixels of "small" shapes (8-12 px wide, about one 8 px patch)
LARGE_RADIUS = (7, 14)
SMALL_PROB = 0.3
SIDE_MARGIN = 0.4       # an object is "left" if its centre is in the left 40% of the image (etc.)

# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class ShapeObj:
    kind: str       # circle / square / triangle
    color: str      # key of COLORS
    x: int          # centre
    y: int
    r: int          # half extent

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x - self.r, self.y - self.r, self.x + self.r, self.y + self.r)

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Glyph:
    char: str
    color: str      # key of GLYPH_COLORS
    x: int          # top-left corner of the glyph's ink box
    y: int
    size: int       # font size in pixels

    @property
    def kind(self) -> str:
        return "number" if self.char.isdigit() else "letter"

    @property
    def box(self) -> tuple[int, int, int, int]:
        """The ink box (left, top, right, bottom) as drawn by :func:`render_scene`."""
        mask = _glyph_mask(self.char, self.size)
        return (self.x, self.y, self.x + mask.width, self.y + mask.height)


@dataclass(frozen=True)
class Scene:
    shapes: tuple[ShapeObj, ...]
    glyph: Glyph | None = None
    background: tuple[int, int, int] = (0, 0, 0)
    size: int = IMAGE_SIZE

    # helpers used by the question generators
    def count(self, kind: str | None = None, color: str | None = None) -> int:
        return sum(1 for s in self.shapes
                   if (kind is None or s.kind == kind) and (color is None or s.color == color))

    def unique_by_name(self) -> list[ShapeObj]:
        return [s for s in self.shapes if self.count(s.kind, s.color) == 1]


@dataclass(frozen=True)
class QA:
    question: str          # MME style questions carry no suffix here; writers add it
    answer: str            # "Yes"/"No" for yes/no questions, else one lower-case word
    family: str            # MME subtask name or GQA family
    binary: bool           # yes/no question
    program: tuple = ()    # GQA-style (operation, argument) pairs


@dataclass
class Sample:
    image: Image.Image
    question: str          # MME-style questions include " Please answer yes or no."
    answer: str            # target text ("yes"/"no"/one word), lower-case
    family: str
    style: str             # "mme" or "gqa"
    scene: Scene = field(repr=False, default=None)


@lru_cache(maxsize=64)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size), 1
    except (TypeError, OSError, AttributeError):  # old Pillow / no FreeType: bitmap font scaled up
        return ImageFont.load_default(), max(1, round(size / 11))


@lru_cache(maxsize=512)
def _glyph_mask(char: str, size: int) -> Image.Image:
    """An 'L' mask of the glyph cropped to its ink box."""
    font, scale = _font(size)
    canvas = Image.new("L", (size * 2 // scale + 8, size * 2 // scale + 8), 0)
    ImageDraw.Draw(canvas).text((4, 4), char, fill=255, font=font)
    box = canvas.getbbox()
    mask = canvas.crop(box) if box else canvas
    if scale > 1:
        mask = mask.resize((mask.width * scale, mask.height * scale), Image.NEAREST)
    return mask


def _draw_scene(scene: Scene, img: Image.Image, shape_fill: Callable, glyph_fill, hard: bool = False) -> Image.Image:
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        fill = shape_fill(s)
        if s.kind == "circle":
            draw.ellipse(s.box, fill=fill)
        elif s.kind == "square":
            q = max(3, round(s.r * 0.88))  # similar area to the circle
            draw.rectangle((s.x - q, s.y - q, s.x + q, s.y + q), fill=fill)
        elif s.kind == "triangle":
            draw.polygon([(s.x, s.y - s.r), (s.x - s.r, s.y + s.r), (s.x + s.r, s.y + s.r)], fill=fill)
        else:  # pragma: no cover
            raise ValueError(s.kind)
    if scene.glyph is not None:
        g = scene.glyph
        mask = _glyph_mask(g.char, g.size)
        if hard:  # class ids must not be blended by the anti-aliased edge
            mask = mask.point(lambda v: 255 if v >= 128 else 0)
        img.paste(Image.new(img.mode, mask.size, glyph_fill), (g.x, g.y), mask)
    return img


def render_scene(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.size, scene.size), scene.background)
    glyph_rgb = GLYPH_COLORS[scene.glyph.color] if scene.glyph else None
    return _draw_scene(scene, img, lambda s: COLORS[s.color], glyph_rgb)


# Classes of :func:`label_map`: 0 background, then every (colour, shape), then every glyph.
LABEL_CLASSES = ("background", *(f"{c} {k}" for c in COLORS for k in SHAPES), *(LETTERS + DIGITS))


def label_map(scene: Scene) -> Image.Image:
    """Per-pixel class ids (mode 'L', same geometry as :func:`render_scene`): index into ``LABEL_CLASSES``.

    Used by the trainer's auxiliary patch-classification loss, never by evaluation.
    """
    img = Image.new("L", (scene.size, scene.size), 0)
    glyph_id = LABEL_CLASSES.index(scene.glyph.char) if scene.glyph else 0
    return _draw_scene(scene, img, lambda s: LABEL_CLASSES.index(s.name), glyph_id, hard=True)


def _boxes_clear(a, b, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _place_shapes(rng: random.Random, n: int, size: int, avoid: Sequence[tuple] = (),
                  small_prob: float = SMALL_PROB) -> list[ShapeObj]:
    shapes: list[ShapeObj] = []
    boxes = list(avoid)
    for _ in range(n):
        for _try in range(60):
            lo, hi = SMALL_RADIUS if rng.random() < small_prob else LARGE_RADIUS
            r = rng.randint(lo, hi)
            x = rng.randint(r + 1, size - r - 2)
            y = rng.randint(r + 1, size - r - 2)
            s = ShapeObj(rng.choice(SHAPES), rng.choice(list(COLORS)), x, y, r)
            if all(_boxes_clear(s.box, b, 3) for b in boxes):
                shapes.append(s)
                boxes.append(s.box)
                break
    return shapes


def random_scene(rng: random.Random, *, text: bool = False, max_objects: int = DEFAULT_MAX_OBJECTS,
                 size: int = IMAGE_SIZE) -> Scene:
    """A scene with 1..max_objects shapes, or (``text=True``) one glyph plus 0..2 small extra shapes."""
    max_objects = max(1, int(max_objects))
    background = rng.choice(BACKGROUNDS)
    if not text:
        n = rng.randint(1, max_objects)
        return Scene(tuple(_place_shapes(rng, n, size)), None, background, size)
    char = rng.choice(LETTERS + DIGITS)
    gsize = rng.randint(26, 56)
    mask = _glyph_mask(char, gsize)
    gx = rng.randint(1, max(1, size - mask.width - 2))
    gy = rng.randint(1, max(1, size - mask.height - 2))
    glyph = Glyph(char, rng.choice(list(GLYPH_COLORS)), gx, gy, gsize)
    n_extra = rng.randint(0, min(2, max_objects - 1))
    shapes = _place_shapes(rng, n_extra, size, avoid=[glyph.box])
    return Scene(tuple(shapes), glyph, background, size)
