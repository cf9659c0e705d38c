"""Alias of :mod:`vtprune.cli.perf`, kept so that existing scripts importing ``vtprune.benchmarks.perf_cli`` keep
working. New code imports ``vtprune.cli.perf``."""

from ..cli import perf as _target
from ..cli.perf import *  # noqa: F401,F403
from ..cli.perf import __all__  # noqa: F401


def __getattr__(name: str):
    # every other attribute (DESCRIPTION, private helpers old scripts reach for) comes from the real module
    return getattr(_target, name)
