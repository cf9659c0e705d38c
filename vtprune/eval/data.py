"""The benchmark data of one run: :class:`TaskData` (a task's questions and folder), the default and cached
synthetic sets, :func:`detect_task` (which benchmark a folder holds), :func:`load_task` with ``--limit`` and the
eval-tool ids of the predictions."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..embedded import synthetic
from .tasks import gqa as gqa_mod
from .tasks import mme as mme_mod
from .tasks import pope as pope_mod
from .tasks import TASKS


ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
ASSET_DATA = {"mme": ASSETS_DIR / "synthetic_mme", "gqa": ASSETS_DIR / "synthetic_gqa",
              "pope": ASSETS_DIR / "synthetic_pope"}


@dataclass
class TaskData:
    name: str  # "mme", "gqa" or "pope"
    root: Path
    questions: list

    @property
    def metric(self) -> str:
        if self.name == "gqa":
            return "GQA accuracy (%)"
        if self.name == "pope":
            return "POPE F1 (%, LLaVA eval_pope, mean of categories)"
        return "MME Perception+Cognition" if _has_cognition(self.questions) else "MME Perception"


def _has_cognition(questions) -> bool:
    return any(q.subtask in mme_mod.COGNITION_SUBTASKS for q in questions)


def _cache_dir() -> Path:
    env = os.environ.get("VTPRUNE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vtprune"


def default_data_dir(task: str) -> Path:
    """The embedded synthetic set of ``task``: ``vtprune/assets/synthetic_<task>``, or (while it is not shipped)
    the same set generated once, deterministically, into the vtprune cache folder."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    shipped = ASSET_DATA[task]
    if shipped.is_dir() and any(shipped.iterdir()):
        return shipped
    sizes = {"mme": 30, "pope": 20, "gqa": 200}
    seeds = {"mme": synthetic.MME_SEED, "pope": synthetic.POPE_SEED, "gqa": synthetic.GQA_SEED}
    return cached_synthetic_set(f"synthetic_{task}", task, seeds[task], sizes[task])


def cached_synthetic_set(name: str, task: str, seed: int, size: int) -> Path:
    """The synthetic ``task`` set drawn with ``seed`` (``size``: MME images per subtask, POPE images, GQA
    questions), generated once into ``<vtprune cache>/<name>``; written to a temporary folder and renamed, so
    concurrent ranks / workers never see a half-written set."""
    target = _cache_dir() / name
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        if task == "mme":
            synthetic.write_mme(tmp, seed=seed, per_subtask=size)
        elif task == "pope":
            synthetic.write_pope(tmp, seed=seed, n_images=size)
        else:
            synthetic.write_gqa(tmp, seed=seed, n_questions=size)
        try:
            tmp.rename(target)  # atomic: concurrent ranks / workers never see a half-written set
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def detect_task(root: str | os.PathLike) -> str:
    """``gqa`` for a folder with a ``*questions*.json`` file, ``pope`` for one with a ``*pope*.json[l]`` (or a
    ``.jsonl``) question file, ``mme`` for one with subtask folders."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"vtprune bench: data folder {root} does not exist")
    if (root / gqa_mod.QUESTIONS_FILE).is_file():
        return "gqa"
    if pope_mod.is_pope_folder(root):
        return "pope"
    if any(root.glob("*questions*.json")):
        return "gqa"
    if any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        return "mme"
    raise ValueError(f"vtprune bench: {root} is neither an MME release folder (one folder per subtask), a "
                     f"GQA folder ({gqa_mod.QUESTIONS_FILE} + images/) nor a POPE folder "
                     "(coco_pope_{random,popular,adversarial}.json or a *pope*.jsonl, + images/)")


def limit_mme(questions: Sequence, limit: int | None) -> list:
    """The first ``ceil(limit / 2)`` images taken round-robin over subtasks (both questions of each image, so
    acc+ stays defined), in the loader's order."""
    if limit is None:
        return list(questions)
    images: dict[str, list[tuple[int, str]]] = {}
    for i, q in enumerate(questions):
        keys = images.setdefault(q.subtask, [])
        if not keys or keys[-1][1] != q.image_name:
            keys.append((i, q.image_name))
    want = (limit + 1) // 2
    chosen: set[tuple[str, str]] = set()
    queues = [list(v) for v in images.values()]
    depth = 0
    while len(chosen) < want and any(depth < len(qs) for qs in queues):
        for subtask, qs in zip(images, queues):
            if depth < len(qs) and len(chosen) < want:
                chosen.add((subtask, qs[depth][1]))
        depth += 1
    return [q for q in questions if (q.subtask, q.image_name) in chosen]


def load_task(task: str, root: str | os.PathLike | None = None, limit: int | None = None) -> TaskData:
    """The questions of ``task`` (the first ``limit``, as each task selects them) from ``root`` (default: the
    embedded synthetic set). Every image they use is decoded once here, so a broken file is a ValueError naming
    it (:class:`~.tasks.datachecks.ImageDecodeError`) before any model work."""
    from .tasks.datachecks import check_images

    root = Path(root) if root is not None else default_data_dir(task)
    if task == "mme":
        questions = limit_mme(mme_mod.load_mme(root), limit)
    elif task == "gqa":
        questions = gqa_mod.load_gqa(root, limit=limit)
    elif task == "pope":
        questions = pope_mod.limit_pope(pope_mod.load_pope(root), limit)
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    check_images(q.image_path for q in questions)
    return TaskData(task, root, questions)


def prediction_ids(task: str, questions: Sequence) -> list[str]:
    if task == "mme":
        return [f"{q.question_id}#{q.index}" for q in questions]
    if task == "pope":
        return [q.key for q in questions]
    return [str(q.question_id) for q in questions]
