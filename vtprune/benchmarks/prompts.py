"""Alias of :mod:`vtprune.eval.tasks.prompts`, kept so that existing scripts importing ``vtprune.benchmarks.prompts``
keep working. New code imports ``vtprune.eval.tasks.prompts``."""

from ..eval.tasks import prompts as _target
from ..eval.tasks.prompts import *  # noqa: F401,F403
from ..eval.tasks.prompts import __all__  # noqa: F401


def __getattr__(name: str):
    # every other attribute (constants, private helpers old scripts reach for) comes from the real module
    return getattr(_target, name)
