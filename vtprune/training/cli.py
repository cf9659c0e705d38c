"""Alias of :mod:`vtprune.cli.train_dyvte` and :mod:`vtprune.cli.calibrate_sinks` (the two commands this module
held), kept so that existing scripts importing ``vtprune.training.cli`` keep working. New code imports those."""

from ..cli import calibrate_sinks as _sinks, train_dyvte as _train
from ..cli.calibrate_sinks import *  # noqa: F401,F403
from ..cli.train_dyvte import *  # noqa: F401,F403

__all__ = _train.__all__ + _sinks.__all__


def __getattr__(name: str):
    # every other attribute (private helpers old scripts reach for) comes from the real modules, train-dyvte's first
    for target in (_train, _sinks):
        if hasattr(target, name):
            return getattr(target, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
