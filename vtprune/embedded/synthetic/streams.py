"""In-memory synthetic samples: the endless training streams and the fixed validation list.

Random streams are namespaced (``"train"``, ``"conv"``, ``"val"``) so that training and held-out data never
share a stream, even for equal integer seeds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from PIL import Image

from .gqa import gqa_question
from .mme import mme_pair
from .scenes import (DEFAULT_MAX_OBJECTS, GQA_FAMILIES, MME_SUBTASKS, VALIDATION_SEED, Sample, Scene,
                     random_scene, render_scene)
from .templates import describe, with_mme_suffix

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
