"""What a benchmark task is to the rest of vtprune: :class:`BenchTask`. Every task module (or package)
``vtprune.eval.tasks.<name>`` defines ``TASK``, an instance of a subclass; the bench, the search and the DyVTE
trainer reach a task only through it (:func:`vtprune.eval.tasks.get_task`), so a new benchmark is one module plus
its name in ``vtprune.eval.tasks.TASKS``."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Sequence


def cell(x, fmt: str) -> str:
    """A table cell: ``-`` for a missing number."""
    return "-" if x is None else format(x, fmt)


def aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as lines, the first column left-aligned and the others right-aligned to the widest cell."""
    widths = [max(len(x) for x in col) for col in zip(*rows)]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in rows]


class BenchTask:
    """One benchmark: its data folder format, prompt convention, scorer and its part of the bench outputs.

    ``questions`` are the objects the task's loader returns (each has ``image_path`` and ``question``); a
    ``score`` dict is ``report.to_dict()`` plus ``"score"`` (the headline number), as ``results.json`` holds it.
    """

    name: ClassVar[str]
    prompt_benchmark: ClassVar[str]  # the build_prompt convention: "mme" (yes/no) or "gqa" (short answer)
    folder_description: ClassVar[str]  # how the no-task-found error describes this task's folder
    synthetic_seed: ClassVar[int]  # the embedded test set; its dev split (vtprune search) uses seed + 100
    synthetic_size: ClassVar[int]  # its size in the unit write_synthetic takes
    dev_size: ClassVar[int]
    trains_dyvte: ClassVar[bool] = True  # a folder of this task can train DyVTE routers (short reference answers)

    # ---------------------------------------------------------------------------------------------- data
    def detect(self, root: Path) -> int:
        """How surely ``root`` holds this task (0: not at all); the highest answer wins."""
        raise NotImplementedError

    def load(self, root: Path, limit: int | None) -> list:
        """The questions of the folder; with ``limit``, the first ``limit`` as :meth:`limit` picks them."""
        raise NotImplementedError

    def limit(self, questions: Sequence, limit: int | None) -> list:
        """The first ``limit`` questions of a loaded set (all of them for None)."""
        return list(questions) if limit is None else list(questions[:limit])

    def write_synthetic(self, folder: Path, seed: int, size: int) -> None:
        """Draw the embedded synthetic set into ``folder``."""
        raise NotImplementedError

    def metric(self, questions: Sequence) -> str:
        """What the headline number is, for the outputs."""
        raise NotImplementedError

    def units(self, questions: Sequence) -> list[list[int]]:
        """Questions answered and scored together (indices), interleaved so that any prefix covers the task."""
        return [[i] for i in range(len(questions))]

    def prediction_ids(self, questions: Sequence) -> list[str]:
        return [str(q.question_id) for q in questions]

    def training_answer(self, question) -> str:
        """The reference answer DyVTE routers are trained towards."""
        return question.answer

    # ---------------------------------------------------------------------------------------------- scores
    def score(self, questions: Sequence, predictions: Sequence[str]):
        """The task's report object (``to_dict()`` gives what results.json holds)."""
        raise NotImplementedError

    def headline(self, report) -> float:
        """The one number a run gets for this task (results.json ``score``, the plot's y)."""
        raise NotImplementedError

    def percent(self, report) -> float:
        """The headline as a percentage (vtprune search averages tasks with it)."""
        return self.headline(report)

    def write_predictions(self, folder: Path, questions: Sequence, predictions: Sequence[str]) -> None:
        """The official result format of one configuration, under its ``predictions/<label>/`` folder."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- outputs
    def table_columns(self, results: dict) -> list[str]:
        """This task's columns of the summary table."""
        raise NotImplementedError

    def table_cells(self, results: dict, score: dict) -> list[str]:
        """One run's cells under :meth:`table_columns`."""
        raise NotImplementedError

    def csv_fields(self, score: dict) -> dict:
        """One run's columns of ``results.csv``."""
        raise NotImplementedError

    def detail_lines(self, results: dict) -> list[str]:
        """Lines the console table prints after the summary (per subtask, per category)."""
        return []

    def legend_lines(self, results: dict) -> list[str]:
        """Lines the console table prints at its end, saying what the columns mean."""
        return []

    def plot_title(self, results: dict) -> str:
        return results["tasks"][self.name]["metric"]

