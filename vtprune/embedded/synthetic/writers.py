"""On-disk MME- and GQA-style sets (the release layouts their loaders read), and the shipped held-out sets."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from .gqa import gqa_question
from .scenes import DEFAULT_MAX_OBJECTS, GQA_FAMILIES, GQA_SEED, MME_SEED, MME_SUBTASKS, render_scene
from .streams import _scene_for
from .templates import with_mme_suffix

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
