"""Alias of :mod:`vtprune.eval.tasks` (the task names), kept so that existing scripts importing
``vtprune.benchmarks.tasks`` keep working. New code imports ``vtprune.eval.tasks``."""

from ..eval.tasks import DEFAULT_TASKS, TASKS

__all__ = ["TASKS", "DEFAULT_TASKS"]
