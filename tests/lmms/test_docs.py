"""The task pack's docs (no lmms-eval needed): vtprune's own loaders and prompts, in an order where the first N
docs (lmms-eval ``--limit N``) are the questions ``vtprune bench --limit N`` answers, MME images whole."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from vtprune.eval.data import load_task
from vtprune.lmms import TASKS_DIR
from vtprune.lmms.docs import doc_rows


def _key(q) -> tuple[str, str]:
    return str(q.image_path), q.question


@pytest.mark.parametrize("task, limits", [("mme", (2, 6, 10, 40)), ("gqa", (1, 7, 30)), ("pope", (1, 5, 9, 31))])
def test_first_n_docs_are_the_bench_limit(task, limits):
    rows = doc_rows(task)
    questions = load_task(task).questions
    assert len(rows) == len(questions)
    for n in limits:
        expected = {_key(q) for q in load_task(task, limit=n).questions}
        assert {(r["image_path"], r["question"]) for r in rows[:n]} == expected, n


def test_mme_docs_keep_image_pairs_adjacent():
    rows = doc_rows("mme")
    pairs = [(rows[i]["question_id"], rows[i + 1]["question_id"]) for i in range(0, len(rows), 2)]
    assert all(a == b for a, b in pairs)
    assert set(Counter(r["question_id"] for r in rows).values()) == {2}
    subtasks = {r["category"] for r in rows}
    assert {r["category"] for r in rows[:2 * len(subtasks)]} == subtasks  # a short prefix covers every subtask


def test_prompt_text_is_lmms_evals_convention():
    """lmms-eval's MME / POPE / GQA tasks: the question (MME: " Please answer yes or no." removed) then
    "\\nAnswer the question using a single word or phrase."."""
    post = "\nAnswer the question using a single word or phrase."
    for task in ("mme", "pope", "gqa"):
        for row in doc_rows(task)[:6]:
            question = row["question"].replace(" Please answer yes or no.", "")
            assert row["text"] == question.strip() + post


def test_lmms_tasks_prints_the_pack_folder_without_torch():
    code = ("import sys; from vtprune.cli import main; status = main(['lmms-tasks']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(status)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(TASKS_DIR)
    names = {p.name for p in TASKS_DIR.iterdir()}
    for task in ("mme", "gqa", "pope"):
        assert {f"vtprune_{task}.yaml", f"vtprune_{task}_local.yaml"} <= names
    assert {"utils.py", "split.jsonl", "_template_yaml"} <= names
