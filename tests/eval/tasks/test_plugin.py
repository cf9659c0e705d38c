"""A benchmark task is one plug-in: ``vtprune.eval.tasks.<name>.TASK``. Everything else reaches a task through
``get_task``, so no module outside ``vtprune/eval/tasks/`` names a task: the test parses them and fails on a
string literal equal to a task name used in a comparison, a dict key or a subscript (a branch on the task)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from vtprune.eval.tasks import TASKS, get_task
from vtprune.eval.tasks.base import BenchTask

PACKAGE = Path(__file__).resolve().parents[3] / "vtprune"
TASKS_DIR = PACKAGE / "eval" / "tasks"
# places that legitimately name tasks: the task package, the list of defaults, the synthetic generator (it draws
# each set), the tiny model's card (its own MME / GQA scores) and the aliases of old import paths
EXEMPT = (TASKS_DIR, PACKAGE / "embedded", PACKAGE / "benchmarks", PACKAGE / "search" / "settings.py")


def _branches_on_task(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    """``x == "gqa"``, ``x in ("mme", ...)``, ``{"mme": ...}``, ``scores["pope"]`` in a module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        consts = []
        if isinstance(node, ast.Compare):
            consts = [c for c in [node.left, *node.comparators] for c in ast.walk(c)]
        elif isinstance(node, ast.Dict):
            consts = [k for k in node.keys if k is not None]
        elif isinstance(node, ast.Subscript):
            consts = [node.slice]
        for c in consts:
            if isinstance(c, ast.Constant) and c.value in TASKS:
                found.append(f"{path.relative_to(root)}:{c.lineno}: {c.value!r}")
    return found


def test_no_module_outside_the_task_package_branches_on_a_task_name():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if any(path == e or e in path.parents for e in EXEMPT):
            continue
        offenders += _branches_on_task(path)
    assert not offenders, "branch on a task name outside vtprune/eval/tasks/ (ask the task's BenchTask):\n" + \
        "\n".join(offenders)


def test_the_guard_sees_a_branch(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('def f(task, r):\n    if task == "mme":\n        return r["scores"]["gqa"]\n    return {"pope": 1}\n')
    assert len(_branches_on_task(probe, tmp_path)) == 3


@pytest.mark.parametrize("name", TASKS)
def test_every_task_implements_the_whole_plugin(name):
    task = get_task(name)
    assert isinstance(task, BenchTask) and task.name == name
    for attr in ("prompt_benchmark", "folder_description", "synthetic_seed", "synthetic_size", "dev_size"):
        assert hasattr(task, attr), f"{name}: no {attr}"
    required = [n for n, f in vars(BenchTask).items()
                if inspect.isfunction(f) and "raise NotImplementedError" in inspect.getsource(f)]
    missing = [n for n in required if getattr(type(task), n) is getattr(BenchTask, n)]
    assert not missing, f"{name} does not implement {missing}"


def test_an_unknown_task_is_named_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown task 'vqa'; expected one of \('mme', 'gqa', 'pope'\)"):
        get_task("vqa")


def test_detection_order_is_the_documented_one(tmp_path):
    """The release's GQA question file beats POPE files, which beat any other *questions*.json, which beats
    subtask folders (MME)."""
    from vtprune.eval.data import detect_task

    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)  # a folder: MME's sign
    assert detect_task(root) == "mme"
    (root / "val_questions.json").write_text("{}")
    assert detect_task(root) == "gqa"
    (root / "coco_pope_random.json").write_text("")
    assert detect_task(root) == "pope"
    (root / "testdev_balanced_questions.json").write_text("{}")
    assert detect_task(root) == "gqa"
