"""Alias of :mod:`vtprune.perf.oracle`, kept so that existing scripts importing
``vtprune.benchmarks.oracle`` keep working. New code imports ``vtprune.perf.oracle``."""

from ..perf import oracle as _target
from ..perf.oracle import *  # noqa: F401,F403
from ..perf.oracle import __all__  # noqa: F401


def __getattr__(name: str):
    # every other attribute (private helpers old scripts and tests reach for) comes from the real module
    return getattr(_target, name)
