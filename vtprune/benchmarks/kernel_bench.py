"""Alias of :mod:`vtprune.perf.kernel_bench`, kept so that existing scripts importing
``vtprune.benchmarks.kernel_bench`` keep working. New code imports ``vtprune.perf.kernel_bench``."""

from ..perf import kernel_bench as _target
from ..perf.kernel_bench import *  # noqa: F401,F403
from ..perf.kernel_bench import __all__  # noqa: F401


def __getattr__(name: str):
    # every other attribute (private helpers old scripts and tests reach for) comes from the real module
    return getattr(_target, name)


if __name__ == "__main__":  # ``python -m vtprune.benchmarks.kernel_bench``, as before the move
    raise SystemExit(_target.main(prog="python -m vtprune.benchmarks.kernel_bench"))
