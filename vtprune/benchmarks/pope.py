"""Alias of :mod:`vtprune.eval.tasks.pope`, kept so that existing scripts importing ``vtprune.benchmarks.pope``
keep working. New code imports ``vtprune.eval.tasks.pope``."""

from ..eval.tasks import pope as _target
from ..eval.tasks.pope import *  # noqa: F401,F403
from ..eval.tasks.pope import __all__  # noqa: F401


def __getattr__(name: str):
    # every other attribute (constants, private helpers old scripts reach for) comes from the real module
    return getattr(_target, name)
