"""Alias of :mod:`vtprune.cli.bench`, kept so that existing scripts importing ``vtprune.benchmarks.cli`` keep
working. New code imports ``vtprune.cli.bench``."""

from ..cli import bench as _target
from ..cli.bench import *  # noqa: F401,F403
from ..cli.bench import __all__  # noqa: F401


def __getattr__(name: str):
    # every other attribute (DESCRIPTION, private helpers old scripts reach for) comes from the real module
    return getattr(_target, name)
