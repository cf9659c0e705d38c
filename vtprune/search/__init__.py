"""Hyperparameter search for pruning methods on optuna: ``vtprune.search(...)`` and ``vtprune search``.

    result = vtprune.search(method="vflowopt", keep=16, objective="flow", trials=30)
    result.best          # a configs/-format mapping; also written to <out>/best.yaml

Modules: :mod:`.space` (a study's space and its sampling; the declarations methods make next to their
fields are :mod:`vtprune.space`, re-exported there),
:mod:`.plan` (methods, budgets and fixed fields, checked without a model), :mod:`.objectives` (flow,
accuracy, prefill time, the dev split), :mod:`.study` (the optuna driver: storage, resuming, several workers;
its parts are :mod:`.settings`, :mod:`.checks`, :mod:`.storage`, :mod:`.trials` and :mod:`.loop`),
:mod:`.outputs` (best.yaml, trials.csv, plots); the command ``vtprune search`` is :mod:`vtprune.cli.search`.

``vtprune.search`` is the function (it shadows this package as an attribute of ``vtprune``): import the
modules with ``from vtprune.search import space`` or ``from vtprune.search.space import Float``.
Only :mod:`.space` is imported with vtprune; optuna is imported when a search runs.
"""

from .space import Choice, Float, Int, Seq, tuned


def search(**kwargs):
    """Run a search; keywords are :class:`~vtprune.search.settings.SearchSettings` fields (``method``, ``keep`` /
    ``ratio``, ``objective``, ``trials``, ``data``, ``study``, ``storage``, ``out``, ``pareto``, ``calib``,
    ``sampler``, ``timeout``, ``fixed``, ``params`` ...) and ``model`` (a folder, hub id, or a loaded model with
    ``processor=``). Returns a :class:`~vtprune.search.settings.SearchResult`; bad input raises
    :class:`vtprune.cli.UsageError` (a ValueError) before anything is loaded or written."""
    from .study import search as _search

    return _search(**kwargs)


__all__ = ["search", "tuned", "Float", "Int", "Choice", "Seq"]
