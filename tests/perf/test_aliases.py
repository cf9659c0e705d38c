"""The old ``vtprune.benchmarks.<module>`` paths of the perf library (kept for existing scripts) hand out the
``vtprune.perf`` objects, and ``python -m vtprune.benchmarks.kernel_bench`` still runs under its old name."""

import importlib
import runpy
import sys

import pytest

OLD_TO_NEW = {"perf": "timing", "perf_suite": "suite", "perf_output": "output", "perf_run": "run",
              "oracle": "oracle", "flops": "flops", "archs": "archs", "kernel_bench": "kernel_bench"}


@pytest.mark.parametrize("old", sorted(OLD_TO_NEW))
def test_old_import_paths_are_aliases_of_the_perf_modules(old):
    alias = importlib.import_module(f"vtprune.benchmarks.{old}")
    target = importlib.import_module(f"vtprune.perf.{OLD_TO_NEW[old]}")
    assert alias.__all__ == target.__all__ and alias.__all__
    for name in target.__all__:
        assert getattr(alias, name) is getattr(target, name), name
    # names outside __all__ that scripts and tests reach for come through too
    private = sorted(n for n in vars(target) if n.startswith("_") and callable(vars(target)[n]))
    for name in private:
        assert getattr(alias, name) is getattr(target, name), name
    with pytest.raises(AttributeError):
        alias.no_such_name


def test_old_kernel_bench_module_runs_under_its_old_name(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["kernel_bench", "--dtype", "float8"])
    monkeypatch.delitem(sys.modules, "vtprune.benchmarks.kernel_bench", raising=False)  # as a fresh `python -m`
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("vtprune.benchmarks.kernel_bench", run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "python -m vtprune.benchmarks.kernel_bench: error: --dtype float8: use float32, float16 or bfloat16"
