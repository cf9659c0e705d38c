"""POPE: loader for its two common layouts and a scorer with the lmms-eval and LLaVA conventions side by side.

POPE (Li et al., 2023, "Evaluating Object Hallucination in Large Vision-Language Models") asks
"Is there a <object> in the image?" about images, half of the questions about objects that are there
("yes") and half about objects that are not ("no"); the absent objects are sampled three ways, the
*categories*: ``random`` (any absent object), ``popular`` (the most frequent objects of the dataset)
and ``adversarial`` (the objects that most often co-occur with the image's objects).

Layouts accepted by :func:`load_pope` (a folder, or one question file):

* **official POPE** (``output/coco/`` of the POPE repository): one file per category,
  ``<dataset>_pope_{random,popular,adversarial}.json``, in spite of the extension JSONL: one object per
  line with ``question_id``, ``image`` (file name, e.g. ``COCO_val2014_000000310196.jpg``), ``text`` (the
  question) and ``label`` (``yes``/``no``).  The category is taken from the file name.
* **lmms-eval / HF-dataset style** (``lmms-lab/POPE`` exported to disk, and the embedded synthetic set):
  one ``.jsonl`` (one object per line) or ``.json`` (a JSON array) file of records with ``question``,
  ``answer`` (``yes``/``no``), ``image`` (file name; ``image_source`` and an exported ``{"path": ...}``
  are accepted too) and ``category``, optionally ``question_id`` (or ``id``).

Images are looked up in ``images_dir`` if given, else the first of ``<root>/images``, ``<root>/val2014``
and ``<root>``; a name without an extension is tried with ``.jpg``, ``.png`` and ``.jpeg``.  Any
malformed input raises :class:`POPEFormatError`, whose message starts with ``<file>:<line>:``.

Scoring (:func:`score_pope`) -- every metric per category, over all questions (``all``, pooled) and as the
mean over the categories present (``mean``, how the LLaVA-1.5 and token-pruning papers quote "POPE F1"):
accuracy, precision, recall and F1 with "yes" as the positive class, and the yes-ratio, all in %.
Two answer conventions, each reported in full:

* ``lmms_eval`` -- lmms-eval's ``pope`` task (``tasks/pope/utils.py``): the prediction is lower-cased and
  stripped and must then *equal* ``"yes"`` or ``"no"``; anything else (``"Yes."``, ``"yes, there is"``)
  is neither ("other"): it is wrong for accuracy, is not a positive for precision, and -- as in lmms-eval's
  ``pope_aggregate_recall``, which counts a false negative only for a ``"no"`` -- a ground-truth "yes"
  answered "other" is left out of recall's denominator.  lmms-eval's ``pope_yes_ratio`` is the share of
  *ground-truth* yes answers (always 50% on POPE); here ``yes_ratio`` is the share of *predicted* "yes"
  (the number that shows a yes-bias), and ``other`` counts the unparsed answers.
* ``llava`` -- LLaVA's ``llava/eval/eval_pope.py``: keep the text before the first ``.``, delete commas,
  split on single spaces; if a word is exactly ``No``, ``no`` or ``not`` the answer is "no", else "yes"
  (so every answer is yes or no: ``"There is no dog."`` is "no", ``"I think so"`` and ``""`` are "yes";
  the match is case-sensitive on those three words, so ``"Not sure"`` and ``"NO"`` are "yes", and
  ``"no!"`` is not the word ``no``).  ``yes_ratio`` is ``pred_list.count(1) / len(pred_list)``, as there.

Where a denominator is zero (no predicted or no true positives) precision/recall/F1 are 0, as lmms-eval
(LLaVA's script would raise ZeroDivisionError).  :func:`write_answers` writes the predictions as a LLaVA
answers file (JSONL with ``question_id``, ``prompt``, ``text``) with ``category`` and ``label`` added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ...._parts import getattr_from_parts
from ....embedded.synthetic.scenes import POPE_SEED
from ..base import BenchTask, aligned, cell
from .data import (CATEGORIES, IMAGE_EXTENSIONS, QUESTIONS_FILE, POPEFormatError, POPEQuestion, find_question_files,
                   is_pope_folder, limit_pope, load_pope, write_answers)
from .scoring import (CONVENTIONS, METRICS, POPEMetrics, POPEReport, parse_llava, parse_lmms_eval, score_pope)

__all__ = [
    "CATEGORIES",
    "CONVENTIONS",
    "METRICS",
    "QUESTIONS_FILE",
    "IMAGE_EXTENSIONS",
    "POPEFormatError",
    "POPEQuestion",
    "POPEMetrics",
    "POPEReport",
    "find_question_files",
    "is_pope_folder",
    "load_pope",
    "limit_pope",
    "parse_lmms_eval",
    "parse_llava",
    "score_pope",
    "write_answers",
    "POPETask",
    "TASK",
]

__getattr__ = getattr_from_parts(__name__, __name__, ("data", "scoring"))  # private names old scripts reach for

# the table's POPE columns: category means under LLaVA's eval_pope and lmms-eval's conventions
POPE_COLUMNS = ["POPE F1", "POPE acc", "F1 lmms", "acc lmms", "yes %"]
POPE_CELLS = [("llava", "f1"), ("llava", "accuracy"), ("lmms_eval", "f1"), ("lmms_eval", "accuracy"),
              ("llava", "yes_ratio")]


class POPETask(BenchTask):
    name = "pope"
    prompt_benchmark = "mme"  # yes/no questions put as MME's are: LLaVA-1.5's and lmms-eval's POPE prompt
    folder_description = "a POPE folder (coco_pope_{random,popular,adversarial}.json or a *pope*.jsonl, + images/)"
    synthetic_seed, synthetic_size, dev_size = POPE_SEED, 20, 10  # sizes: images
    trains_dyvte = False  # every reference answer is yes or no

    def detect(self, root: Path) -> int:
        return 3 if is_pope_folder(root) else 0

    def load(self, root: Path, limit: int | None) -> list:
        return limit_pope(load_pope(root), limit)

    def limit(self, questions: Sequence, limit: int | None) -> list:
        return limit_pope(questions, limit)

    def units(self, questions: Sequence) -> list[list[int]]:
        """One question per unit, round-robin over the categories: the order :func:`limit_pope` takes them in,
        so the first N units are what ``--limit N`` answers (the lmms-eval task pack relies on it)."""
        queues: dict[str, list[int]] = {}
        for i, q in enumerate(questions):
            queues.setdefault(q.category, []).append(i)
        depth = max((len(v) for v in queues.values()), default=0)
        return [[v[d]] for d in range(depth) for v in queues.values() if d < len(v)]

    def write_synthetic(self, folder: Path, seed: int, size: int) -> None:
        from ....embedded import synthetic

        synthetic.write_pope(folder, seed=seed, n_images=size)

    def metric(self, questions: Sequence) -> str:
        return "POPE F1 (%, LLaVA eval_pope, mean of categories)"

    def prediction_ids(self, questions: Sequence) -> list[str]:
        return [q.key for q in questions]

    def score(self, questions: Sequence, predictions: Sequence[str]) -> POPEReport:
        return score_pope(questions, predictions)

    def headline(self, report: POPEReport) -> float:
        """F1 in %, LLaVA's eval_pope convention, mean over the categories."""
        return float(report.f1)

    def write_predictions(self, folder: Path, questions: Sequence, predictions: Sequence[str]) -> None:
        write_answers(folder / "pope_answers.jsonl", questions, predictions)

    def table_columns(self, results: dict) -> list[str]:
        return list(POPE_COLUMNS)

    def table_cells(self, results: dict, score: dict) -> list[str]:
        return [cell(score[conv]["mean"][metric], ".1f") for conv, metric in POPE_CELLS]

    def csv_fields(self, score: dict) -> dict:
        row = {}
        for conv in CONVENTIONS:
            for metric in METRICS:
                row[f"pope_{metric}_{conv}"] = score[conv]["mean"][metric]
            row[f"pope_other_{conv}"] = score[conv]["all"]["other"]
            for cat, m in score[conv]["categories"].items():
                for metric in METRICS:
                    row[f"pope_{cat}_{metric}_{conv}"] = m[metric]
        return row

    def detail_lines(self, results: dict) -> list[str]:
        head = ["", "POPE per category, F1 % as LLaVA eval_pope / lmms-eval (exact yes|no) / predicted yes %:"]
        runs = [r for r in results["runs"] if not r.get("error")]
        if not runs:
            return head
        categories = runs[0]["scores"]["pope"]["categories"]
        rows = [[r["label"]] + [
            f"{p['llava']['categories'][c]['f1']:.1f} / {p['lmms_eval']['categories'][c]['f1']:.1f} / "
            f"{p['llava']['categories'][c]['yes_ratio']:.0f}" for c in categories]
            for r in runs for p in [r["scores"]["pope"]]]
        return head + aligned([["config"] + categories] + rows)

    def legend_lines(self, results: dict) -> list[str]:
        return ["POPE F1/acc: LLaVA eval_pope (first sentence, a no/not word = no, else yes); F1/acc lmms: "
                "lmms-eval (the answer must be exactly yes or no); yes % = predicted yes (LLaVA); "
                "means over the categories"]


TASK = POPETask()
