"""Alias of :mod:`vtprune.eval.tasks.mme`, kept so that existing scripts importing ``vtprune.benchmarks.mme``
keep working. New code imports ``vtprune.eval.tasks.mme``."""

from ..eval.tasks import mme as _target
from ..eval.tasks.mme import *  # noqa: F401,F403
from ..eval.tasks.mme import __all__  # noqa: F401


def __getattr__(name: str):
    # every other attribute (constants, private helpers old scripts reach for) comes from the real module
    return getattr(_target, name)
