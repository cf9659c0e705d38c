"""Deterministic synthetic visual-QA data: shapes and glyphs drawn with PIL.

Everything here is seeded: the same ``seed`` gives the same images, questions and
answers on the same PIL version.  Three consumers:

* :func:`write_mme` writes a folder in the MME release layout (one folder per
  subtask, ``NNNN.png`` next to ``NNNN.txt`` holding two ``question<TAB>Yes|No``
  lines, questions ending in " Please answer yes or no.").
* :func:`write_gqa` writes a GQA-style ``testdev_balanced_questions.json`` (dict keyed
  by question id, with the fields of the official file) plus ``images/<imageId>.png``.
* :func:`write_pope` writes a POPE-style ``pope.jsonl`` (records with ``question_id``, ``question``,
  ``answer`` yes/no, ``image``, ``category`` and the image's ``objects``) plus ``images/<name>.png``:
  "Is there a <colour> <shape> in the image?" about present objects and, per category, as many absent
  ones sampled at random, among the most frequent objects of the set (popular) or among the objects that
  most often co-occur with the image's objects (adversarial).
* :func:`training_samples` yields an endless stream of in-memory
  :class:`Sample` objects (image, question, answer) over the same question
  families, with a curriculum knob (the maximum number of objects per image).

Random streams are namespaced (``"train"``, ``"mme"``, ``"gqa"``, ``"pope"``, ``"val"``) so that
training and held-out data never share a stream, even for equal integer seeds.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Sequence

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "IMAGE_SIZE",
    "COLORS",
    "SHAPES",
    "LETTERS",
    "DIGITS",
    "MME_SUBTASKS",
    "GQA_FAMILIES",
    "MME_SUFFIX",
    "DEFAULT_MAX_OBJECTS",
    "MME_SEED",
    "GQA_SEED",
    "VALIDATION_SEED",
    "ShapeObj",
    "Glyph",
    "Scene",
    "QA",
    "Sample",
    "render_scene",
    "label_map",
    "LABEL_CLASSES",
    "random_scene",
    "mme_pair",
    "side",
    "gqa_question",
    "training_samples",
    "training_conversations",
    "family_key",
    "describe",
    "Conversation",
    "validation_samples",
    "write_mme",
    "write_gqa",
    "write_heldout_assets",
    "POPE_SEED",
    "POPE_CATEGORIES",
    "POPE_OBJECTS",
    "POPE_QUESTIONS_FILE",
    "pope_question",
    "pope_scenes",
    "pope_objects",
    "pope_statistics",
    "pope_negatives",
    "write_pope",
    "with_mme_suffix",
    "vocabulary_texts",
    "GQA_QUESTIONS_FILE",
]

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


# --------------------------------------------------------------------------- question templates
# Each family has a fixed set of templates; ``vocabulary_texts`` enumerates them so the
# word-level tokenizer of the tiny model covers every word that can ever be generated.

T = {
    "exist_cs": ["Is there a {color} {shape} in the image?", "Is there a {color} {shape}?"],
    "exist_s": ["Is there a {shape} in the image?"],
    "count_qn": ["Are there exactly {n} {nouns} in the image?", "Are there {n} {nouns} in the image?"],
    "count_open": ["How many {nouns} are there?", "How many {nouns} are in the image?"],
    "pos_h": ["Is the {name} on the {side} side of the image?"],
    "pos_v": ["Is the {name} at the {vside} of the image?"],
    "pos_h_open": ["Is the {name} on the left or right side of the image?", "Is the {name} on the left or the right?"],
    "pos_v_open": ["Is the {name} at the top or bottom of the image?", "Is the {name} at the top or the bottom?"],
    "color_yn": ["Is the {shape} {color}?", "Is the color of the {shape} {color}?"],
    "color_open": ["What color is the {shape}?", "Which color is the {shape}?"],
    "shape_open": ["What shape is the {color} object?", "Which shape is {color}?"],
    "ocr_yn": ["Does the image show the {kind} {char}?", "Is the {kind} {char} shown in the image?"],
    "ocr_open": ["What {kind} is shown in the image?", "Which {kind} is written in the image?"],
    "describe": ["Which objects are in the image?", "List the objects in the image from left to right."],
}
FULL_ANSWERS = {
    "exist_yes": "Yes, there is a {name}.", "exist_no": "No, there is no {name}.",
    "count": "There are {n} {nouns}.", "pos": "The {name} is on the {side}.",
    "color": "The {shape} is {color}.", "shape": "The {color} object is a {shape}.",
    "ocr": "The {kind} is {char}.",
}


def _count_targets(scene: Scene) -> list[tuple[str, str, int]]:
    """Every countable phrase for ``scene``: (singular, plural, count) for all shapes, each kind and each colour."""
    out = [(noun, PLURAL[noun], len(scene.shapes)) for noun in ("shape", "object")]
    for kind in sorted({s.kind for s in scene.shapes}):
        out.append((kind, PLURAL[kind], scene.count(kind=kind)))
    for color in sorted({s.color for s in scene.shapes}):
        for noun in ("shape", "object"):
            out.append((f"{color} {noun}", f"{color} {PLURAL[noun]}", scene.count(color=color)))
    return out


def _count_nouns(scene: Scene, rng: random.Random, min_count: int = 1) -> tuple[str, str, int] | None:
    """Pick a count target present in the scene: (singular, plural, count), or None.

    The count is drawn over the distinct counts available (1 at half weight), so that
    answers are not dominated by "1" (every single shape is a count-1 target).
    """
    targets = [t for t in _count_targets(scene) if t[2] >= min_count]
    if not targets:
        return None
    counts = sorted({t[2] for t in targets})
    n = rng.choices(counts, weights=[0.5 if c == 1 else 1.0 for c in counts])[0]
    return rng.choice([t for t in targets if t[2] == n])


def _wrong_count(n: int, rng: random.Random, low: int = 1) -> int:
    options = [m for m in (n - 2, n - 1, n - 1, n + 1, n + 1, n + 2) if low <= m <= MAX_COUNT and m != n]
    return rng.choice(options)


def _count_question(n: int, nouns: str, rng: random.Random) -> str:
    return rng.choice(T["count_qn"]).format(n=n, nouns=nouns)


def side(s: ShapeObj, size: int, axis: str) -> str | None:
    """Side of the image ``s`` is clearly on along ``axis`` ("h": left/right, "v": top/bottom), or None (middle)."""
    c = s.x if axis == "h" else s.y
    if c < SIDE_MARGIN * size:
        return "left" if axis == "h" else "top"
    if c > (1 - SIDE_MARGIN) * size:
        return "right" if axis == "h" else "bottom"
    return None


_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def _referable(scene: Scene) -> list[tuple[ShapeObj, str]]:
    """Objects that a phrase identifies uniquely: 'red circle', or 'circle' when it is the only one."""
    out = []
    for s in scene.shapes:
        if scene.count(kind=s.kind) == 1:
            out.append((s, s.kind))
        elif scene.count(s.kind, s.color) == 1:
            out.append((s, s.name))
    return out


def _position_candidates(scene: Scene) -> list[tuple[str, str, str]]:
    """(name, axis "h"|"v", side) for every referable shape that is clearly on one side of the image."""
    cands = []
    for s, name in _referable(scene):
        for axis in "hv":
            where = side(s, scene.size, axis)
            if where:
                cands.append((name, axis, where))
    return cands


def mme_pair(scene: Scene, subtask: str, rng: random.Random) -> tuple[QA, QA] | None:
    """One Yes and one No question for ``subtask`` about ``scene`` (None if not applicable)."""
    if subtask == "existence":
        if not scene.shapes:
            return None
        s = rng.choice(scene.shapes)
        if rng.random() < 0.25:
            absent = [k for k in SHAPES if scene.count(kind=k) == 0]
            if absent:
                yes = rng.choice(T["exist_s"]).format(shape=s.kind)
                no = rng.choice(T["exist_s"]).format(shape=rng.choice(absent))
                return (QA(yes, "Yes", subtask, True, (("exist", s.kind),)),
                        QA(no, "No", subtask, True))
        absent = [(c, k) for c in COLORS for k in SHAPES if scene.count(k, c) == 0]
        hard = [(c, k) for (c, k) in absent if c == s.color or k == s.kind]
        c, k = rng.choice(hard if hard and rng.random() < 0.6 else absent)
        yes = rng.choice(T["exist_cs"]).format(color=s.color, shape=s.kind)
        no = rng.choice(T["exist_cs"]).format(color=c, shape=k)
        return QA(yes, "Yes", subtask, True), QA(no, "No", subtask, True)
    if subtask == "count":
        # Both questions count at least 2 so that they share the plural wording: a singular
        # "Is there exactly 1 ..." would only ever be asked as the Yes question of a
        # one-object target, and the grammar alone would give the answer away.
        target = _count_nouns(scene, rng, min_count=2)
        if target is None:
            return None
        _noun, nouns, n = target
        m = _wrong_count(n, rng, low=2)
        return (QA(_count_question(n, nouns, rng), "Yes", subtask, True),
                QA(_count_question(m, nouns, rng), "No", subtask, True))
    if subtask == "position":
        cands = _position_candidates(scene)
        if not cands:
            return None
        name, axis, side = rng.choice(cands)
        key, fld = ("pos_h", "side") if axis == "h" else ("pos_v", "vside")
        tmpl = rng.choice(T[key])
        return (QA(tmpl.format(name=name, **{fld: side}), "Yes", subtask, True),
                QA(tmpl.format(name=name, **{fld: _OPPOSITE[side]}), "No", subtask, True))
    if subtask == "color":
        cands = [s for s in scene.shapes if scene.count(kind=s.kind) == 1]
        if not cands:
            return None
        s = rng.choice(cands)
        others = [c for c in COLORS if c != s.color]
        present = [o.color for o in scene.shapes if o.color != s.color]
        wrong = rng.choice(present if present and rng.random() < 0.5 else others)
        tmpl = rng.choice(T["color_yn"])
        return (QA(tmpl.format(shape=s.kind, color=s.color), "Yes", subtask, True),
                QA(tmpl.format(shape=s.kind, color=wrong), "No", subtask, True))
    if subtask == "OCR":
        g = scene.glyph
        if g is None:
            return None
        pool = DIGITS if g.kind == "number" else LETTERS
        wrong = rng.choice([c for c in pool if c != g.char])
        tmpl = rng.choice(T["ocr_yn"])
        return (QA(tmpl.format(kind=g.kind, char=g.char), "Yes", subtask, True),
                QA(tmpl.format(kind=g.kind, char=wrong), "No", subtask, True))
    raise ValueError(f"unknown MME subtask {subtask!r}; expected one of {MME_SUBTASKS}")


def gqa_question(scene: Scene, family: str, rng: random.Random) -> tuple[QA, str] | None:
    """A one-word-answer question of ``family``: (QA, fullAnswer), or None if not applicable."""
    if family == "existence":
        pair = mme_pair(scene, "existence", rng)
        if pair is None:
            return None
        qa = pair[0] if rng.random() < 0.5 else pair[1]
        ans = qa.answer.lower()
        subj = qa.question.split("Is there a ", 1)[1].split("?")[0].replace(" in the image", "")
        full = FULL_ANSWERS["exist_yes" if ans == "yes" else "exist_no"].format(name=subj)
        return QA(qa.question, ans, family, True, (("select", subj), ("exist", "?"))), full
    if family == "shape":
        cands = [s for s in scene.shapes if scene.count(color=s.color) == 1]
        if not cands:
            return None
        s = rng.choice(cands)
        q = rng.choice(T["shape_open"]).format(color=s.color)
        return (QA(q, s.kind, family, False, (("select", "object"), ("filter color", s.color), ("query", "name"))),
                FULL_ANSWERS["shape"].format(color=s.color, shape=s.kind))
    if family == "count":
        target = _count_nouns(scene, rng)
        if target is None:
            return None
        noun, nouns, n = target
        q = rng.choice(T["count_open"]).format(nouns=nouns)
        return (QA(q, str(n), family, False, (("select", nouns), ("count", "?"))),
                FULL_ANSWERS["count"].format(n=n, nouns=nouns if n != 1 else noun).replace("There are 1", "There is 1"))
    if family == "position":
        cands = _position_candidates(scene)
        if not cands:
            return None
        name, axis, side = rng.choice(cands)
        q = rng.choice(T["pos_h_open" if axis == "h" else "pos_v_open"]).format(name=name)
        opts = "left|right" if axis == "h" else "top|bottom"
        return (QA(q, side, family, False, (("select", name), ("choose " + ("hposition" if axis == "h" else "vposition"), opts))),
                FULL_ANSWERS["pos"].format(name=name, side=side))
    if family == "color":
        cands = [s for s in scene.shapes if scene.count(kind=s.kind) == 1]
        if not cands:
            return None
        s = rng.choice(cands)
        q = rng.choice(T["color_open"]).format(shape=s.kind)
        return (QA(q, s.color, family, False, (("select", s.kind), ("query", "color"))),
                FULL_ANSWERS["color"].format(shape=s.kind, color=s.color))
    if family == "ocr":
        g = scene.glyph
        if g is None:
            return None
        q = rng.choice(T["ocr_open"]).format(kind=g.kind)
        return (QA(q, g.char.lower(), family, False, (("select", "text"), ("query", g.kind))),
                FULL_ANSWERS["ocr"].format(kind=g.kind, char=g.char))
    raise ValueError(f"unknown GQA family {family!r}; expected one of {GQA_FAMILIES}")


def describe(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """(question, answer) listing every object from left to right, e.g. "red circle letter k blue square".

    A dense training target (one word per attribute of every object) that makes the
    vision tower encode the whole scene; it is never part of the evaluation sets.
    """
    items = [(s.x, s.name) for s in scene.shapes]
    if scene.glyph is not None:
        g = scene.glyph
        items.append((g.x + g.size // 4, f"{g.kind} {g.char.lower()}"))
    return rng.choice(T["describe"]), " ".join(name for _, name in sorted(items))


def with_mme_suffix(question: str) -> str:
    return f"{question} {MME_SUFFIX}"


# --------------------------------------------------------------------------- in-memory samples

def _scene_for(rng: random.Random, family: str, max_objects: int, mme: bool, tries: int = 50):
    """Draw scenes until the family's question applies; returns (scene, generator result)."""
    text = family in ("OCR", "ocr")
    if mme and family == "count":
        max_objects = max(2, max_objects)  # MME count questions need a target counted at least twice
    for _ in range(tries):
        scene = random_scene(rng, text=text, max_objects=max_objects)
        out = mme_pair(scene, family, rng) if mme else gqa_question(scene, family, rng)
        if out is not None:
            return scene, out
    raise RuntimeError(f"could not generate a {family!r} question in {tries} tries")


def _value(x):
    return x() if callable(x) else x


def _sample_stream(rng: random.Random, max_objects, mme_fraction) -> Iterator[Sample]:
    while True:
        mo = _value(max_objects)
        if rng.random() < _value(mme_fraction):
            family = rng.choice(MME_SUBTASKS)
            scene, (yes, no) = _scene_for(rng, family, mo, mme=True)
            qa = yes if rng.random() < 0.5 else no
            yield Sample(render_scene(scene), with_mme_suffix(qa.question), qa.answer.lower(), family, "mme", scene)
        else:
            family = rng.choice(GQA_FAMILIES)
            scene, (qa, _full) = _scene_for(rng, family, mo, mme=False)
            yield Sample(render_scene(scene), qa.question, qa.answer, family, "gqa", scene)


def training_samples(seed: int = 0, max_objects: int | Callable[[], int] = DEFAULT_MAX_OBJECTS,
                     mme_fraction: float | Callable[[], float] = 0.5) -> Iterator[Sample]:
    """Endless stream of training samples.

    ``max_objects`` is the curriculum knob: an int, or a zero-argument callable read
    before every sample (so a trainer can raise it as training progresses).
    ``mme_fraction`` (a float or such a callable) is the share of MME-style yes/no
    questions (with the " Please answer yes or no." suffix; answers "yes"/"no"); the
    rest are GQA-style questions with one-word answers.
    """
    return _sample_stream(random.Random(f"train-{seed}"), max_objects, mme_fraction)


@dataclass
class Conversation:
    """One image with several questions about it (multi-turn training example)."""
    image: Image.Image
    turns: list            # list of (question, answer, family, style) tuples, like Sample fields
    scene: Scene = field(repr=False, default=None)


def _candidates(scene: Scene, rng: random.Random) -> tuple[list, list]:
    """All MME-style (yes and no) and GQA-style questions that apply to ``scene``."""
    mme, gqa = [], []
    for sub in MME_SUBTASKS:
        pair = mme_pair(scene, sub, rng)
        if pair:
            mme += [(with_mme_suffix(qa.question), qa.answer.lower(), sub, "mme") for qa in pair]
    for fam in GQA_FAMILIES:
        out = gqa_question(scene, fam, rng)
        if out:
            gqa.append((out[0].question, out[0].answer, fam, "gqa"))
    return mme, gqa


def family_key(family: str) -> str:
    """The question family shared by the two formats (MME's ``OCR`` is GQA's ``ocr``)."""
    return family.lower()


def training_conversations(seed: int = 0, max_objects: int | Callable[[], int] = DEFAULT_MAX_OBJECTS,
                           mme_fraction: float | Callable[[], float] = 0.5, turns: int = 4,
                           text_fraction: float = 1 / 6,
                           families: Sequence[str] | Callable[[], Sequence[str]] | None = None,
                           describe_prob: float = 0.0) -> Iterator[Conversation]:
    """Endless stream of images with up to ``turns`` distinct questions each (LLaVA-style multi-turn data).

    The first turn follows the same family mix as :func:`training_samples`; later turns
    are drawn from the remaining questions about the same image (a Yes and a No question
    of one MME subtask can both appear, which gives a contrastive signal).
    ``families`` (names as in :func:`family_key`; a sequence or a zero-argument callable
    read per image) restricts every turn to those families: the trainer's family
    curriculum.  With probability ``describe_prob`` a last turn asks for the list of
    objects (:func:`describe`), with family ``"describe"``.
    """
    rng = random.Random(f"conv-{seed}")
    while True:
        mo = _value(max_objects)
        mf = _value(mme_fraction)
        allowed = set(_value(families) or GQA_FAMILIES)
        shape_mme = [f for f in MME_SUBTASKS[:-1] if family_key(f) in allowed]
        shape_gqa = [f for f in GQA_FAMILIES[:-1] if f in allowed]
        text = "ocr" in allowed and (not shape_gqa or rng.random() < text_fraction)
        is_mme = rng.random() < mf and (text or bool(shape_mme))
        if is_mme:
            first_family = "OCR" if text else rng.choice(shape_mme)
        else:
            first_family = "ocr" if text else rng.choice(shape_gqa)
        scene, _ = _scene_for(rng, first_family, mo, mme=is_mme)
        mme, gqa = _candidates(scene, rng)
        mme = [c for c in mme if family_key(c[2]) in allowed]
        gqa = [c for c in gqa if c[2] in allowed]
        first_pool = [c for c in (mme if is_mme else gqa) if c[2] == first_family]
        first = rng.choice(first_pool)
        chosen = [first]
        mme = [c for c in mme if c != first] if mf > 0 else []
        gqa = [c for c in gqa if c != first] if mf < 1 else []
        while len(chosen) < turns and (mme or gqa):
            pool = mme if (mme and (not gqa or rng.random() < mf)) else gqa
            chosen.append(pool.pop(rng.randrange(len(pool))))
        if describe_prob and rng.random() < describe_prob:
            chosen.append((*describe(scene, rng), "describe", "gqa"))
        yield Conversation(render_scene(scene), chosen, scene)


def validation_samples(n: int, seed: int = VALIDATION_SEED, max_objects: int = DEFAULT_MAX_OBJECTS,
                       mme_fraction: float = 0.5) -> list[Sample]:
    """A fixed list of held-out samples (own random stream, distinct from training and the shipped sets)."""
    stream = _sample_stream(random.Random(f"val-{seed}"), max_objects, mme_fraction)
    return [next(stream) for _ in range(n)]


# --------------------------------------------------------------------------- on-disk writers

def write_mme(root: str | Path, seed: int = MME_SEED, per_subtask: int = 30,
              max_objects: int = DEFAULT_MAX_OBJECTS, subtasks: Sequence[str] = MME_SUBTASKS) -> Path:
    """Write an MME-release-style folder: ``root/<subtask>/NNNN.png`` + ``NNNN.txt``."""
    root = Path(root)
    for subtask in subtasks:
        rng = random.Random(f"mme-{seed}-{subtask}")
        d = root / subtask
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_subtask):
            scene, (yes, no) = _scene_for(rng, subtask, max_objects, mme=True)
            stem = f"{i:04d}"
            render_scene(scene).save(d / f"{stem}.png", optimize=True)
            lines = [f"{with_mme_suffix(yes.question)}\tYes", f"{with_mme_suffix(no.question)}\tNo"]
            (d / f"{stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


GQA_QUESTIONS_FILE = "testdev_balanced_questions.json"
_STRUCTURAL = {"existence": "verify", "shape": "query", "count": "query", "position": "choose",
               "color": "query", "ocr": "query"}
_SEMANTIC = {"existence": "obj", "shape": "attr", "count": "obj", "position": "rel", "color": "attr", "ocr": "attr"}


def write_gqa(root: str | Path, seed: int = GQA_SEED, n_questions: int = 200,
              max_objects: int = DEFAULT_MAX_OBJECTS, questions_per_image: int = 2) -> Path:
    """Write a GQA-style folder: ``root/testdev_balanced_questions.json`` + ``root/images/<imageId>.png``."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"gqa-{seed}")
    questions: dict[str, dict] = {}
    img_idx = 0
    qnum = 0
    shape_families = [f for f in GQA_FAMILIES if f != "ocr"]
    while len(questions) < n_questions:
        text = rng.random() < 1 / len(GQA_FAMILIES)
        first = "ocr" if text else rng.choice(shape_families)
        scene, first_out = _scene_for(rng, first, max_objects, mme=False)
        outs = [first_out]
        others = [f for f in shape_families if f != first]
        rng.shuffle(others)
        for fam in others:
            if len(outs) >= questions_per_image:
                break
            o = gqa_question(scene, fam, rng)
            if o is not None:
                outs.append(o)
        image_id = f"syn{img_idx:05d}"
        img_idx += 1
        render_scene(scene).save(root / "images" / f"{image_id}.png", optimize=True)
        for qa, full in outs:
            if len(questions) >= n_questions:
                break
            qid = f"{seed % 1000:03d}{qnum:06d}"
            qnum += 1
            semantic = [{"operation": op, "dependencies": [j - 1] if j else [], "argument": arg}
                        for j, (op, arg) in enumerate(qa.program)]
            questions[qid] = {
                "semantic": semantic,
                "entailed": [],
                "equivalent": [qid],
                "question": qa.question,
                "imageId": image_id,
                "isBalanced": True,
                "groups": {"global": qa.family if not qa.binary else None, "local": f"{qa.family}-{qa.answer}"},
                "answer": qa.answer,
                "semanticStr": " -> ".join(f"{op}: {arg}" for op, arg in qa.program),
                "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
                "types": {"detailed": qa.family, "semantic": _SEMANTIC[qa.family],
                          "structural": _STRUCTURAL[qa.family]},
                "fullAnswer": full,
            }
    (root / GQA_QUESTIONS_FILE).write_text(json.dumps(questions, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return root


def write_heldout_assets(assets_dir: str | Path) -> tuple[Path, Path]:
    """(Re)generate the held-out sets shipped in ``vtprune/assets``: 30 images/subtask MME, 200-question GQA."""
    assets_dir = Path(assets_dir)
    mme = write_mme(assets_dir / "synthetic_mme", seed=MME_SEED, per_subtask=30)
    gqa = write_gqa(assets_dir / "synthetic_gqa", seed=GQA_SEED, n_questions=200)
    return mme, gqa


# --------------------------------------------------------------------------- POPE

POPE_CATEGORIES = ("random", "popular", "adversarial")
POPE_OBJECTS = tuple(f"{c} {k}" for c in COLORS for k in SHAPES)  # the object vocabulary: colour + shape
POPE_QUESTIONS_FILE = "pope.jsonl"


def pope_question(name: str) -> str:
    """POPE's question wording (also the first existence template of the MME/GQA sets)."""
    color, shape = name.split(" ")
    return T["exist_cs"][0].format(color=color, shape=shape)


def pope_objects(scene: Scene) -> tuple[str, ...]:
    """The distinct objects ("red circle", ...) of a scene, sorted."""
    return tuple(sorted({s.name for s in scene.shapes}))


def pope_statistics(images: Sequence[Sequence[str]]) -> tuple[dict, dict]:
    """(frequency, co-occurrence) over a set: images each object is in, images each ordered pair shares."""
    frequency = {o: 0 for o in POPE_OBJECTS}
    cooccurrence: dict[tuple[str, str], int] = {}
    for objects in images:
        for a in objects:
            frequency[a] += 1
            for b in objects:
                if a != b:
                    cooccurrence[(a, b)] = cooccurrence.get((a, b), 0) + 1
    return frequency, cooccurrence


def pope_negatives(objects: Sequence[str], category: str, k: int, rng: random.Random, frequency: dict,
                   cooccurrence: dict, tie_rank: dict | None = None) -> list[str]:
    """``k`` distinct objects absent from an image with ``objects``, sampled as POPE's ``category`` says.

    random: uniformly among the absent objects; popular: the absent objects most frequent in the set;
    adversarial: the absent objects with the most co-occurrences (summed over the image's objects), then the
    most frequent. Ties go by ``tie_rank`` (object -> int; default: vocabulary order).
    """
    present = set(objects)
    absent = [o for o in POPE_OBJECTS if o not in present]
    if k > len(absent):
        raise ValueError(f"{k} negatives asked but only {len(absent)} objects are absent")
    rank = tie_rank or {o: i for i, o in enumerate(POPE_OBJECTS)}
    if category == "random":
        return rng.sample(absent, k)
    if category == "popular":
        return sorted(absent, key=lambda o: (-frequency[o], rank[o]))[:k]
    if category == "adversarial":
        co = {o: sum(cooccurrence.get((p, o), 0) for p in present) for o in absent}
        return sorted(absent, key=lambda o: (-co[o], -frequency[o], rank[o]))[:k]
    raise ValueError(f"unknown POPE category {category!r}; expected one of {POPE_CATEGORIES}")


def _pope_scenes(rng: random.Random, n_images: int, positives: int, max_objects: int) -> list[Scene]:
    max_objects = max(max_objects, positives)
    scenes = []
    while len(scenes) < n_images:
        scene = random_scene(rng, max_objects=max_objects)
        if len(pope_objects(scene)) >= positives:
            scenes.append(scene)
    return scenes


def pope_scenes(seed: int = POPE_SEED, n_images: int = 20, positives: int = 2,
                max_objects: int = DEFAULT_MAX_OBJECTS) -> list[Scene]:
    """The scenes :func:`write_pope` draws (image ``i`` is ``popeNNNNN.png``) for the same arguments."""
    return _pope_scenes(random.Random(f"pope-{seed}"), n_images, positives, max_objects)


def write_pope(root: str | Path, seed: int = POPE_SEED, n_images: int = 20, positives: int = 2,
               max_objects: int = DEFAULT_MAX_OBJECTS) -> Path:
    """Write a POPE-style folder: ``root/pope.jsonl`` + ``root/images/popeNNNNN.png``.

    Every image has at least ``positives`` distinct objects; each category asks about ``positives`` of them
    (the same ones in every category, as in POPE) and about as many absent objects (:func:`pope_negatives`),
    so each category is balanced yes/no. Within a category the questions go image by image, alternating
    yes and no. Records carry the image's full object list (``objects``), as POPE's are built from COCO's
    annotations; the loader ignores it.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"pope-{seed}")
    scenes = _pope_scenes(rng, n_images, positives, max_objects)
    images = [pope_objects(s) for s in scenes]
    frequency, cooccurrence = pope_statistics(images)
    order = list(POPE_OBJECTS)
    rng.shuffle(order)  # tie-break of popular / adversarial: a fixed random order, not the alphabet
    tie_rank = {o: i for i, o in enumerate(order)}
    names = [f"pope{i:05d}.png" for i in range(n_images)]
    for scene, name in zip(scenes, names):
        render_scene(scene).save(root / "images" / name, optimize=True)
    chosen = [rng.sample(objs, positives) for objs in images]
    records, qid = [], 0
    for category in POPE_CATEGORIES:
        crng = random.Random(f"pope-{seed}-{category}")
        for objs, pos, name in zip(images, chosen, names):
            neg = pope_negatives(objs, category, positives, crng, frequency, cooccurrence, tie_rank)
            for yes, no in zip(pos, neg):
                for obj, answer in ((yes, "yes"), (no, "no")):
                    qid += 1
                    records.append({"question_id": qid, "question": pope_question(obj), "answer": answer,
                                    "image": name, "category": category, "objects": list(objs)})
    (root / POPE_QUESTIONS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return root


# --------------------------------------------------------------------------- vocabulary

def vocabulary_texts() -> list[str]:
    """Texts covering every word the generators can emit (templates, fillers, answers)."""
    texts: list[str] = []
    for templates in list(T.values()) + [list(FULL_ANSWERS.values())]:
        for t in templates:
            literal = t
            for ph in ("{color}", "{shape}", "{noun}", "{nouns}", "{n}", "{side}", "{vside}", "{name}",
                       "{kind}", "{char}"):
                literal = literal.replace(ph, " ")
            texts.append(literal)
    texts += list(COLORS) + list(SHAPES) + list(PLURAL.values()) + ["shape", "object"]
    texts += ["left", "right", "top", "bottom", "letter", "number", "yes", "no", "Yes", "No", MME_SUFFIX]
    texts += [str(i) for i in range(0, MAX_COUNT + 3)]
    texts += list(LETTERS) + list(DIGITS) + list(string.ascii_uppercase) + list(string.digits)
    texts += ["There is 1"]
    return texts
