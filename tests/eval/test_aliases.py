"""The old module paths of the bench runner and the benchmark tasks (``vtprune.benchmarks.runner``, ``.mme``,
``.gqa``, ``.pope``, ``.prompts``, ``.tasks``, ``.datachecks``) are aliases of their Layout v3 homes in
``vtprune.eval`` / ``vtprune.loading``: every exported name is the same object, private helpers resolve too,
and a patch of ``vtprune.loading.load_model`` reaches scripts that call ``runner.load_model``."""

import importlib

import pytest

from vtprune import loading

from ..helpers import defined_in

ALIASES = {  # old path -> its real module(s), found here by file, not through the alias
    "vtprune.benchmarks.mme": ("vtprune.eval.tasks.mme",),
    "vtprune.benchmarks.gqa": ("vtprune.eval.tasks.gqa",),
    "vtprune.benchmarks.pope": ("vtprune.eval.tasks.pope",),
    "vtprune.benchmarks.prompts": ("vtprune.eval.tasks.prompts",),
    "vtprune.benchmarks.datachecks": ("vtprune.eval.tasks.datachecks",),
    "vtprune.benchmarks.tasks": ("vtprune.eval.tasks",),
    "vtprune.benchmarks.runner": ("vtprune.eval.sweep", "vtprune.eval.checks", "vtprune.loading", "vtprune.eval.data",
                                  "vtprune.eval.shard", "vtprune.eval.answer", "vtprune.eval.run",
                                  "vtprune.eval.results", "vtprune.eval.report", "vtprune.eval.tasks",
                                  "vtprune.cliargs"),
}


@pytest.mark.parametrize("old", sorted(ALIASES))
def test_every_exported_name_is_the_real_object(old):
    alias = importlib.import_module(old)
    assert alias.__all__, old
    for name in alias.__all__:
        assert getattr(alias, name) is defined_in(name, ALIASES[old]), f"{old}.{name}"


@pytest.mark.parametrize("old, private", [("vtprune.benchmarks.runner", "_csv_rows"),
                                          ("vtprune.benchmarks.runner", "_cache_dir"),
                                          ("vtprune.benchmarks.runner", "resolve_device"),
                                          ("vtprune.benchmarks.gqa", "_find_questions_file")])
def test_private_helpers_resolve_through_the_alias(old, private):
    assert getattr(importlib.import_module(old), private) is defined_in(private, ALIASES[old])


def test_a_renamed_helper_keeps_its_old_name_on_the_alias():
    from vtprune import loading

    assert importlib.import_module("vtprune.benchmarks.runner")._num_threads is loading.num_threads


def test_an_unknown_name_is_an_attribute_error():
    runner = importlib.import_module("vtprune.benchmarks.runner")
    with pytest.raises(AttributeError, match="no_such_name"):
        runner.no_such_name


def test_a_patch_of_loading_reaches_runner_load_model(monkeypatch):
    runner = importlib.import_module("vtprune.benchmarks.runner")
    stand_in = lambda *a, **k: None  # noqa: E731
    monkeypatch.setattr(loading, "load_model", stand_in)
    assert runner.load_model is stand_in
    from vtprune.benchmarks.runner import load_model  # a script's lazy import, as perf and search do

    assert load_model is stand_in
