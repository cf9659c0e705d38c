"""Alias of :mod:`vtprune.embedded.tiny_llava`, kept so that existing scripts importing
``vtprune.benchmarks.tiny_llava`` keep working. New code imports ``vtprune.embedded.tiny_llava``."""

from ..embedded import tiny_llava as _target
from ..embedded.tiny_llava import *  # noqa: F401,F403
from ..embedded.tiny_llava import __all__  # noqa: F401


def __getattr__(name: str):
    # every other attribute (token ids, private helpers old scripts reach for) comes from the real module
    return getattr(_target, name)
