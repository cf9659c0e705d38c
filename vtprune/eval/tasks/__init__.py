"""The benchmarks. A task is a module or package ``vtprune.eval.tasks.<name>`` (``mme``, ``gqa``, ``pope``: loader,
answer parsing, scorer, official output format) that defines ``TASK``, a :class:`~.base.BenchTask`; its name in
:data:`TASKS` is all the rest of vtprune needs. Shared prompt conventions are in ``prompts`` and loader checks in
``datachecks``. This package itself imports nothing heavy: the command-line parsers check ``--task`` with
:data:`TASKS` before torch loads."""

from __future__ import annotations

import importlib

TASKS = ("mme", "gqa", "pope")
DEFAULT_TASKS = ("mme", "gqa")  # no --task / --task all without --data (the demo); POPE runs when asked for


def get_task(name: str):
    """The :class:`~.base.BenchTask` of ``name`` (one of :data:`TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {TASKS}")
    return importlib.import_module(f".{name}", __name__).TASK
