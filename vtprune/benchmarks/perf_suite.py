"""Alias of :mod:`vtprune.perf.suite`, kept so that existing scripts importing
``vtprune.benchmarks.perf_suite`` keep working. New code imports ``vtprune.perf.suite``."""

from ..perf import suite as _target
from ..perf.suite import *  # noqa: F401,F403
from ..perf.suite import __all__  # noqa: F401


def __getattr__(name: str):
    # every other attribute (private helpers old scripts and tests reach for) comes from the real module
    return getattr(_target, name)
