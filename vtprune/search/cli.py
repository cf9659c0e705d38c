"""Alias of :mod:`vtprune.cli.search`, kept so that existing scripts importing ``vtprune.search.cli`` keep
working. New code imports ``vtprune.cli.search``."""

from ..cli import search as _target
from ..cli.search import *  # noqa: F401,F403
from ..cli.search import __all__  # noqa: F401


def __getattr__(name: str):
    # every other attribute (DESCRIPTION, private helpers old scripts reach for) comes from the real module
    return getattr(_target, name)
