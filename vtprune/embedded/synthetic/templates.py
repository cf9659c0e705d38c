"""Question templates shared by the MME-, GQA- and POPE-style generators, and the helpers they share.

:func:`vocabulary_texts` enumerates every word the templates can produce, so the word-level tokenizer of
the tiny model covers all of them.
"""

from __future__ import annotations

import random
import string

from .scenes import (COLORS, DIGITS, LETTERS, MAX_COUNT, MME_SUFFIX, PLURAL, SHAPES, SIDE_MARGIN, Scene,
                     ShapeObj)

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
