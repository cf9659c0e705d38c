"""GQA-style questions: one open question with a one-word answer (plus GQA's fullAnswer) per family."""

from __future__ import annotations

import random

from .mme import mme_pair
from .scenes import GQA_FAMILIES, QA, Scene
from .templates import FULL_ANSWERS, T, _count_nouns, _position_candidates


def gqa_question(scene: Scene, family: str, rng: random.Random) -> tuple[QA, str] | None:
    """A one-word-answer question of ``family``: (QA, fullAnswer), or None if not applicable."""
    if family not in GQA_FAMILIES:
        raise ValueError(f"unknown GQA family {family!r}; expected one of {GQA_FAMILIES}")
    return _QUESTIONS[family](scene, rng)


def _existence(scene: Scene, rng: random.Random) -> tuple[QA, str] | None:
    # the MME pair's wording, one of its two questions, answered in lower case
    pair = mme_pair(scene, "existence", rng)
    if pair is None:
        return None
    qa = pair[0] if rng.random() < 0.5 else pair[1]
    ans = qa.answer.lower()
    subj = qa.question.split("Is there a ", 1)[1].split("?")[0].replace(" in the image", "")
    full = FULL_ANSWERS["exist_yes" if ans == "yes" else "exist_no"].format(name=subj)
    return QA(qa.question, ans, "existence", True, (("select", subj), ("exist", "?"))), full


def _shape(scene: Scene, rng: random.Random) -> tuple[QA, str] | None:
    cands = [s for s in scene.shapes if scene.count(color=s.color) == 1]
    if not cands:
        return None
    s = rng.choice(cands)
    q = rng.choice(T["shape_open"]).format(color=s.color)
    return (QA(q, s.kind, "shape", False, (("select", "object"), ("filter color", s.color), ("query", "name"))),
            FULL_ANSWERS["shape"].format(color=s.color, shape=s.kind))


def _count(scene: Scene, rng: random.Random) -> tuple[QA, str] | None:
    target = _count_nouns(scene, rng)
    if target is None:
        return None
    noun, nouns, n = target
    q = rng.choice(T["count_open"]).format(nouns=nouns)
    return (QA(q, str(n), "count", False, (("select", nouns), ("count", "?"))),
            FULL_ANSWERS["count"].format(n=n, nouns=nouns if n != 1 else noun).replace("There are 1", "There is 1"))


def _position(scene: Scene, rng: random.Random) -> tuple[QA, str] | None:
    cands = _position_candidates(scene)
    if not cands:
        return None
    name, axis, side = rng.choice(cands)
    q = rng.choice(T["pos_h_open" if axis == "h" else "pos_v_open"]).format(name=name)
    opts = "left|right" if axis == "h" else "top|bottom"
    return (QA(q, side, "position", False, (("select", name), ("choose " + ("hposition" if axis == "h" else "vposition"), opts))),
            FULL_ANSWERS["pos"].format(name=name, side=side))


def _color(scene: Scene, rng: random.Random) -> tuple[QA, str] | None:
    cands = [s for s in scene.shapes if scene.count(kind=s.kind) == 1]
    if not cands:
        return None
    s = rng.choice(cands)
    q = rng.choice(T["color_open"]).format(shape=s.kind)
    return (QA(q, s.color, "color", False, (("select", s.kind), ("query", "color"))),
            FULL_ANSWERS["color"].format(shape=s.kind, color=s.color))


def _ocr(scene: Scene, rng: random.Random) -> tuple[QA, str] | None:
    g = scene.glyph
    if g is None:
        return None
    q = rng.choice(T["ocr_open"]).format(kind=g.kind)
    return (QA(q, g.char.lower(), "ocr", False, (("select", "text"), ("query", g.kind))),
            FULL_ANSWERS["ocr"].format(kind=g.kind, char=g.char))


_QUESTIONS = {"existence": _existence, "shape": _shape, "count": _count, "position": _position,
              "color": _color, "ocr": _ocr}
