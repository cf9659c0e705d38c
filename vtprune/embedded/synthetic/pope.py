"""POPE-style set: "Is there a <colour> <shape> in the image?" about present and absent objects.

Negatives are sampled per POPE category: at random, among the most frequent objects of the set (popular) or
among the objects that most often co-occur with the image's objects (adversarial).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from .scenes import COLORS, DEFAULT_MAX_OBJECTS, POPE_SEED, SHAPES, Scene, random_scene, render_scene
from .templates import T

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
