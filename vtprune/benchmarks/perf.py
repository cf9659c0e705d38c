"""Alias of :mod:`vtprune.perf.timing`, kept so that existing scripts importing
``vtprune.benchmarks.perf`` keep working. New code imports ``vtprune.perf.timing``."""

from ..perf import timing as _target
from ..perf.timing import *  # noqa: F401,F403
from ..perf.timing import __all__  # noqa: F401


def __getattr__(name: str):
    # every other attribute (private helpers old scripts and tests reach for) comes from the real module
    return getattr(_target, name)
