"""Alias of :mod:`vtprune.perf.archs`, kept so that existing scripts importing
``vtprune.benchmarks.archs`` keep working. New code imports ``vtprune.perf.archs``."""

from ..perf import archs as _target
from ..perf.archs import *  # noqa: F401,F403
from ..perf.archs import __all__  # noqa: F401


def __getattr__(name: str):
    # every other attribute (private helpers old scripts and tests reach for) comes from the real module
    return getattr(_target, name)
