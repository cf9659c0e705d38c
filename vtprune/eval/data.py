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

from .tasks import TASKS, get_task
from .tasks.mme import limit_mme  # noqa: F401  (its old home; vtprune.benchmarks.runner re-exports it)


ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
ASSET_DATA = {t: ASSETS_DIR / f"synthetic_{t}" for t in TASKS}


@dataclass
class TaskData:
    name: str  # one of vtprune.eval.tasks.TASKS
    root: Path
    questions: list

    @property
    def task(self):
        """The :class:`~.tasks.base.BenchTask` these questions belong to."""
        return get_task(self.name)

    @property
    def metric(self) -> str:
        return self.task.metric(self.questions)


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
    bench_task = get_task(task)
    return cached_synthetic_set(f"synthetic_{task}", task, bench_task.synthetic_seed, bench_task.synthetic_size)


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
        get_task(task).write_synthetic(tmp, seed, size)
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
    """The task whose :meth:`~.tasks.base.BenchTask.detect` is surest of the folder (the first in ``TASKS`` on a
    tie): ``gqa`` for the release's question file, ``pope`` for ``*pope*.json[l]`` question files, ``gqa`` for
    another ``*questions*.json``, ``mme`` for subtask folders."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"vtprune bench: data folder {root} does not exist")
    sure = {t: get_task(t).detect(root) for t in TASKS}
    best = max(TASKS, key=lambda t: sure[t])
    if sure[best]:
        return best
    described = [get_task(t).folder_description for t in TASKS]
    raise ValueError(f"vtprune bench: {root} is neither {', '.join(described[:-1])} nor {described[-1]}")


def load_task(task: str, root: str | os.PathLike | None = None, limit: int | None = None) -> TaskData:
    """The questions of ``task`` (the first ``limit``, as each task selects them) from ``root`` (default: the
    embedded synthetic set). Every image they use is decoded once here, so a broken file is a ValueError naming
    it (:class:`~.tasks.datachecks.ImageDecodeError`) before any model work."""
    from .tasks.datachecks import check_images

    bench_task = get_task(task)
    root = Path(root) if root is not None else default_data_dir(task)
    questions = bench_task.load(root, limit)
    check_images(q.image_path for q in questions)
    return TaskData(task, root, questions)


def prediction_ids(task: str, questions: Sequence) -> list[str]:
    return get_task(task).prediction_ids(questions)
