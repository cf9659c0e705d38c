"""Layout v3 (issue 24): the ``vtprune`` command is the ``vtprune/cli/`` package. The old module paths of the
sub-commands are aliases of their new modules (every exported name is the same object, private helpers resolve
too), the console scripts in pyproject.toml name the new modules, and the ``python -m`` entry points still run."""

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import defined_in

ROOT = Path(__file__).resolve().parents[2]

ALIASES = {  # old path -> its real module(s), a private helper each, read through the alias
    "vtprune.benchmarks.cli": (("vtprune.cli.bench",), "_quiet_transformers"),
    "vtprune.benchmarks.perf_cli": (("vtprune.cli.perf",), "_ints"),
    "vtprune.search.cli": (("vtprune.cli.search",), "_summary"),
    "vtprune.training.cli": (("vtprune.cli.train_dyvte", "vtprune.cli.calibrate_sinks"), "_sink_batches"),
}


@pytest.mark.parametrize("old", sorted(ALIASES))
def test_old_paths_are_aliases_of_the_cli_modules(old):
    homes, private = ALIASES[old]
    alias = importlib.import_module(old)
    assert alias.__all__, old
    for home in homes:  # every public name of every real module comes through
        assert set(importlib.import_module(home).__all__) <= set(alias.__all__), (old, home)
    for name in alias.__all__:
        assert getattr(alias, name) is defined_in(name, homes), f"{old}.{name}"
    assert getattr(alias, private) is defined_in(private, homes)
    with pytest.raises(AttributeError):
        getattr(alias, "no_such_name")


def test_the_package_keeps_the_names_scripts_import_from_vtprune_cli():
    import vtprune.cli as cli
    from vtprune import cliargs
    from vtprune.cli import args, viz

    for name in ("UsageError", "check_model_spec", "check_prune", "check_out_dir", "check_method"):
        assert getattr(cli, name) is getattr(cliargs, name)
    for name in ("report", "parse_set", "OneLineParser"):
        assert getattr(cli, name) is getattr(args, name)
    assert cli.load_image is viz.load_image
    assert sorted(cli.COMMANDS) == sorted(["bench", "perf", "search", "viz", "train-dyvte", "calibrate-sinks",
                                           "methods", "lmms-tasks", "serve"])


def test_console_scripts_name_the_cli_package():
    text = (ROOT / "pyproject.toml").read_text()
    scripts = dict(re.findall(r'^(vtprune(?:-bench)?) = "([\w.:]+)"$', text, re.M))
    assert scripts == {"vtprune": "vtprune.cli:main", "vtprune-bench": "vtprune.cli.bench:main"}
    for target in scripts.values():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr))


@pytest.mark.parametrize("module, usage", [("vtprune.cli", "usage: vtprune "),
                                           ("vtprune.benchmarks", "usage: vtprune-bench ")])
def test_python_dash_m_entry_points_still_run(module, usage):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", module, "-h"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(usage)
