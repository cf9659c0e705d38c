"""Alias of :mod:`vtprune.eval.tasks.gqa`, kept so that existing scripts importing ``vtprune.benchmarks.gqa``
keep working. New code imports ``vtprune.eval.tasks.gqa``."""

from ..eval.tasks import gqa as _target
from ..eval.tasks.gqa import *  # noqa: F401,F403
from ..eval.tasks.gqa import __all__  # noqa: F401


def __getattr__(name: str):
    # every other attribute (constants, private helpers old scripts reach for) comes from the real module
    return getattr(_target, name)
