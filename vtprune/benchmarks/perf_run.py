"""Alias of :mod:`vtprune.perf.run`, kept so that existing scripts importing
``vtprune.benchmarks.perf_run`` keep working. New code imports ``vtprune.perf.run``."""

from ..perf import run as _target
from ..perf.run import *  # noqa: F401,F403
from ..perf.run import __all__  # noqa: F401


def __getattr__(name: str):
    # every other attribute (private helpers old scripts and tests reach for) comes from the real module
    return getattr(_target, name)
