"""MME-style questions: one Yes and one No question per subtask about a scene (MME's paired design)."""

from __future__ import annotations

import random

from .scenes import COLORS, DIGITS, LETTERS, MME_SUBTASKS, QA, SHAPES, Scene
from .templates import T, _OPPOSITE, _count_nouns, _count_question, _position_candidates, _wrong_count


def mme_pair(scene: Scene, subtask: str, rng: random.Random) -> tuple[QA, QA] | None:
    """One Yes and one No question for ``subtask`` about ``scene`` (None if not applicable)."""
    if subtask not in MME_SUBTASKS:
        raise ValueError(f"unknown MME subtask {subtask!r}; expected one of {MME_SUBTASKS}")
    return _PAIRS[subtask](scene, rng)


def _existence(scene: Scene, rng: random.Random) -> tuple[QA, QA] | None:
    if not scene.shapes:
        return None
    s = rng.choice(scene.shapes)
    if rng.random() < 0.25:
        absent = [k for k in SHAPES if scene.count(kind=k) == 0]
        if absent:
            yes = rng.choice(T["exist_s"]).format(shape=s.kind)
            no = rng.choice(T["exist_s"]).format(shape=rng.choice(absent))
            return (QA(yes, "Yes", "existence", True, (("exist", s.kind),)),
                    QA(no, "No", "existence", True))
    absent = [(c, k) for c in COLORS for k in SHAPES if scene.count(k, c) == 0]
    hard = [(c, k) for (c, k) in absent if c == s.color or k == s.kind]
    c, k = rng.choice(hard if hard and rng.random() < 0.6 else absent)
    yes = rng.choice(T["exist_cs"]).format(color=s.color, shape=s.kind)
    no = rng.choice(T["exist_cs"]).format(color=c, shape=k)
    return QA(yes, "Yes", "existence", True), QA(no, "No", "existence", True)


def _count(scene: Scene, rng: random.Random) -> tuple[QA, QA] | None:
    # Both questions count at least 2 so that they share the plural wording: a singular
    # "Is there exactly 1 ..." would only ever be asked as the Yes question of a
    # one-object target, and the grammar alone would give the answer away.
    target = _count_nouns(scene, rng, min_count=2)
    if target is None:
        return None
    _noun, nouns, n = target
    m = _wrong_count(n, rng, low=2)
    return (QA(_count_question(n, nouns, rng), "Yes", "count", True),
            QA(_count_question(m, nouns, rng), "No", "count", True))


def _position(scene: Scene, rng: random.Random) -> tuple[QA, QA] | None:
    cands = _position_candidates(scene)
    if not cands:
        return None
    name, axis, side = rng.choice(cands)
    key, fld = ("pos_h", "side") if axis == "h" else ("pos_v", "vside")
    tmpl = rng.choice(T[key])
    return (QA(tmpl.format(name=name, **{fld: side}), "Yes", "position", True),
            QA(tmpl.format(name=name, **{fld: _OPPOSITE[side]}), "No", "position", True))


def _color(scene: Scene, rng: random.Random) -> tuple[QA, QA] | None:
    cands = [s for s in scene.shapes if scene.count(kind=s.kind) == 1]
    if not cands:
        return None
    s = rng.choice(cands)
    others = [c for c in COLORS if c != s.color]
    present = [o.color for o in scene.shapes if o.color != s.color]
    wrong = rng.choice(present if present and rng.random() < 0.5 else others)
    tmpl = rng.choice(T["color_yn"])
    return (QA(tmpl.format(shape=s.kind, color=s.color), "Yes", "color", True),
            QA(tmpl.format(shape=s.kind, color=wrong), "No", "color", True))


def _ocr(scene: Scene, rng: random.Random) -> tuple[QA, QA] | None:
    g = scene.glyph
    if g is None:
        return None
    pool = DIGITS if g.kind == "number" else LETTERS
    wrong = rng.choice([c for c in pool if c != g.char])
    tmpl = rng.choice(T["ocr_yn"])
    return (QA(tmpl.format(kind=g.kind, char=g.char), "Yes", "OCR", True),
            QA(tmpl.format(kind=g.kind, char=wrong), "No", "OCR", True))


_PAIRS = {"existence": _existence, "count": _count, "position": _position, "color": _color, "OCR": _ocr}
