"""search/study.py is split by concern (settings, checks, storage, trials, loop); every name it had is still
reachable from it, and outputs.py takes the result type and the trial count from the parts, not the driver."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from vtprune.search import checks, loop, settings, storage, study, trials

SEARCH = Path(study.__file__).resolve().parent

# every public name study.py defined before the split, with the part that now defines it
MOVED = {"SearchSettings": settings, "SearchResult": settings, "Checked": settings, "OBJECTIVES": settings,
         "SAMPLERS": settings, "DEFAULT_TASKS": settings, "DEFAULT_CALIB": settings, "EMBEDDED": settings,
         "check_settings": checks, "check_sampler": checks, "default_study_name": checks,
         "check_storage": storage, "check_existing_study": storage, "open_study": storage, "make_storage": storage,
         "make_sampler": storage, "legacy_constraints": storage, "make_pruner": storage, "HEARTBEAT_S": storage,
         "GRACE_S": storage, "WORKER": storage, "counts": trials, "finished": trials, "reap_dead": trials,
         "ensure_defaults": trials, "make_objective": trials, "stop_on_interrupt": loop, "Progress": loop,
         "MAX_ERRORS_IN_A_ROW": loop}


@pytest.mark.parametrize("name", sorted(MOVED))
def test_study_keeps_every_public_name(name):
    assert getattr(study, name) is getattr(MOVED[name], name)


@pytest.mark.parametrize("name, part", [("_claim", trials), ("_Skipped", trials), ("_safe_url", storage),
                                        ("_tasks", checks), ("_optimize", loop), ("_quiet_optuna", storage)])
def test_study_finds_the_private_names_of_its_parts(name, part):
    assert getattr(study, name) is getattr(part, name)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        study.nothing_here  # noqa: B018


def test_outputs_does_not_import_the_driver():
    tree = ast.parse((SEARCH / "outputs.py").read_text())
    sources = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "study" not in sources and {"settings", "trials"} <= sources
