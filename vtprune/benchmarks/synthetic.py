"""Alias of :mod:`vtprune.embedded.synthetic`, kept so that existing scripts importing
``vtprune.benchmarks.synthetic`` keep working. New code imports ``vtprune.embedded.synthetic``."""

from ..embedded import synthetic as _target
from ..embedded.synthetic import *  # noqa: F401,F403
from ..embedded.synthetic import __all__  # noqa: F401


def __getattr__(name: str):
    # every other attribute (constants, private helpers old scripts reach for) comes from the real module
    return getattr(_target, name)
