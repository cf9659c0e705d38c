"""Deterministic synthetic visual-QA data: shapes and glyphs drawn with PIL (the embedded MME / GQA / POPE sets).

Everything here is seeded: the same ``seed`` gives the same images, questions and
answers on the same PIL version.  Four consumers:

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

from .gqa import gqa_question
from .mme import mme_pair
from .pope import (POPE_CATEGORIES, POPE_OBJECTS, POPE_QUESTIONS_FILE, pope_negatives, pope_objects, pope_question,
                   pope_scenes, pope_statistics, write_pope)
from .scenes import (BACKGROUNDS, COLORS, DEFAULT_MAX_OBJECTS, DIGITS, GLYPH_COLORS, GQA_FAMILIES, GQA_SEED,
                     IMAGE_SIZE, LABEL_CLASSES, LARGE_RADIUS, LETTERS, MAX_COUNT, MME_SEED, MME_SUBTASKS, MME_SUFFIX,
                     PLURAL, POPE_SEED, QA, SHAPES, SIDE_MARGIN, SMALL_PROB, SMALL_RADIUS, VALIDATION_SEED, Glyph,
                     Sample, Scene, ShapeObj, _boxes_clear, label_map, random_scene, render_scene)
from .streams import (Conversation, _scene_for, family_key, training_conversations, training_samples,
                      validation_samples)
from .templates import (FULL_ANSWERS, T, _count_nouns, _count_targets, _referable, describe, side,
                        vocabulary_texts, with_mme_suffix)
from .writers import GQA_QUESTIONS_FILE, write_gqa, write_heldout_assets, write_mme


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
