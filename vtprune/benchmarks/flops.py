"""Alias of :mod:`vtprune.perf.flops`, kept so that existing scripts importing
``vtprune.benchmarks.flops`` keep working. New code imports ``vtprune.perf.flops``."""

from ..perf import flops as _target
from ..perf.flops import *  # noqa: F401,F403
from ..perf.flops import __all__  # noqa: F401


def __getattr__(name: str):
    # every other attribute (private helpers old scripts and tests reach for) comes from the real module
    return getattr(_target, name)
