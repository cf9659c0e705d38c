"""The task pack's data and scoring (``vtprune/lmms/tasks/``: the YAMLs call these through ``utils.py``).

Docs: a vtprune task's questions (its own loader, :func:`vtprune.eval.data.load_task`, on the shipped synthetic
set or a folder in the official layout) as lmms-eval docs, in the task's answering order (:meth:`units`: for
MME both questions of an image together, images round-robin over subtasks, so ``--limit 2k`` answers the k images
``vtprune bench --limit 2k`` answers). The prompt text is vtprune's (:func:`~vtprune.eval.tasks.prompts.
question_text`: MME / POPE drop " Please answer yes or no.", then "\\nAnswer the question using a single word or
phrase.", what lmms-eval's own MME / GQA / POPE tasks send).

Scoring is lmms-eval's own (MME acc + acc+, GQA exact match ignoring case and punctuation, POPE exact yes/no),
plus vtprune's per-request stats as metrics (means per task) when the model is ``vtprune``.
"""

from __future__ import annotations

import os
from collections import Counter

from .recorder import STAT_KEYS, STATS

GQA_MATCH = {"ignore_case": True, "ignore_punctuation": True}  # gqa.yaml's exact_match options


def doc_rows(task: str, root=None) -> list[dict]:
    """lmms-eval docs of vtprune task ``task`` (``root``: its folder; None: the shipped synthetic set)."""
    from ..eval.data import load_task
    from ..eval.tasks.prompts import question_text

    data = load_task(task, root)
    bench = data.task
    order = [i for unit in bench.units(data.questions) for i in unit]
    rows = []
    for row, i in enumerate(order):
        q = data.questions[i]
        rows.append({
            "row": row, "question_id": str(getattr(q, "key", q.question_id)),
            "category": str(getattr(q, "subtask", getattr(q, "category", ""))),
            "question": q.question, "answer": q.answer, "image_path": str(q.image_path),
            "text": question_text(q.question, bench.prompt_benchmark),
        })
    return rows


def dataset(task: str, root=None):
    """The docs as a ``datasets.Dataset`` (what ``process_docs`` returns)."""
    import datasets

    return datasets.Dataset.from_list(doc_rows(task, root))


def official_root(task: str, env: str):
    """The user's local copy of ``task`` in its official layout, from environment variable ``env``."""
    root = os.environ.get(env)
    if not root:
        raise ValueError(f"vtprune_{task}_local: set {env} to your local {task.upper()} folder in the official "
                         f"layout (vtprune bench --data accepts the same folder); nothing is downloaded")
    return root


def doc_to_visual(doc) -> list:
    from PIL import Image

    with Image.open(doc["image_path"]) as img:
        return [img.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None) -> str:
    return doc["text"]


def stat_metrics(task: str, doc) -> dict:
    """vtprune's stats of the request that answered ``doc`` (empty when the model was not ``vtprune``)."""
    stats = STATS.get((task, doc["row"]))
    if stats is None:
        return {}
    return {f"vtprune_{k}": float(stats[k]) for k in STAT_KEYS if stats[k] is not None}


def with_stats(task: str, process_results):
    """``process_results`` of lmms-eval's scorer plus :func:`stat_metrics` for task ``task``."""
    def scored(doc, results):
        return {**process_results(doc, results), **stat_metrics(task, doc)}

    return scored


def gqa_results(doc, results) -> dict:
    """lmms-eval's GQA metric: exact match after stripping, ignoring case and punctuation."""
    from lmms_eval.api.metrics import exact_match_hf_evaluate

    pred = results[0].strip()
    return {"exact_match": exact_match_hf_evaluate([pred], [doc["answer"]], **GQA_MATCH)["exact_match"]}


def mme_aggregate(results) -> float:
    """lmms-eval's MME score on whole images: an image ``--limit`` cut in half (an odd limit) is left out with a
    warning, where lmms-eval's own aggregation would stop on its "pairwise" assertion."""
    from lmms_eval.tasks.mme.utils import mme_aggregate_results
    from loguru import logger

    counts = Counter(r["question_id"] for r in results)
    whole = [r for r in results if counts[r["question_id"]] == 2]
    if len(whole) < len(results):
        logger.warning(f"vtprune MME: {len(results) - len(whole)} question(s) of image(s) answered only once "
                       f"(an odd --limit?) are left out of the score; give an even --limit")
    return mme_aggregate_results(whole) if whole else 0.0
