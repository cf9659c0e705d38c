"""Alias of :mod:`vtprune.perf.output`, kept so that existing scripts importing
``vtprune.benchmarks.perf_output`` keep working. New code imports ``vtprune.perf.output``."""

from ..perf import output as _target
from ..perf.output import *  # noqa: F401,F403
from ..perf.output import __all__  # noqa: F401


def __getattr__(name: str):
    # every other attribute (private helpers old scripts and tests reach for) comes from the real module
    return getattr(_target, name)
