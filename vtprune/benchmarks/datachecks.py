"""Alias of :mod:`vtprune.eval.tasks.datachecks`, kept so that existing scripts importing ``vtprune.benchmarks.datachecks``
keep working. New code imports ``vtprune.eval.tasks.datachecks``."""

from ..eval.tasks import datachecks as _target
from ..eval.tasks.datachecks import *  # noqa: F401,F403
from ..eval.tasks.datachecks import __all__  # noqa: F401


def __getattr__(name: str):
    # every other attribute (constants, private helpers old scripts reach for) comes from the real module
    return getattr(_target, name)
