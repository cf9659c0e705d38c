"""GQA: loader for the official question-file layout and the lmms-eval exact-match scorer.

Layout: ``<root>/testdev_balanced_questions.json`` (a dict keyed by question id; each
value has at least ``imageId``, ``question`` and ``answer``, plus in the official file
``fullAnswer``, ``isBalanced``, ``groups``, ``entailed``, ``equivalent``, ``types``,
``annotations``, ``semantic`` and ``semanticStr``) and ``<root>/images/<imageId>.jpg``
(``.png`` is accepted too).

Scoring (lmms-eval ``gqa`` task): the prediction is ``.strip()``-ed, then prediction and
reference are lower-cased and every ``string.punctuation`` character is removed from both;
the question is right iff the two strings are then equal.  The LLaVA-1.5 conversion
(``convert_gqa_for_eval.py``: ``answer.rstrip('.').lower()``, every trailing "." removed) + the
official ``eval.py`` exact match is available as ``normalization="llava"``.
"""

from __future__ import annotations

import json
import string
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ...embedded.synthetic.scenes import GQA_SEED
from .base import BenchTask, cell
from .datachecks import DuplicateKeys, files_by_stem, one_file

__all__ = [
    "QUESTIONS_FILE",
    "GQAFormatError",
    "GQAQuestion",
    "GQAReport",
    "load_gqa",
    "normalize_answer",
    "exact_match",
    "score_gqa",
    "write_predictions",
    "GQATask",
    "TASK",
]

QUESTIONS_FILE = "testdev_balanced_questions.json"
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


class GQAFormatError(ValueError):
    """A malformed GQA folder; the message names the offending file."""


@dataclass(frozen=True)
class GQAQuestion:
    question_id: str
    image_id: str
    image_path: Path
    question: str
    answer: str
    types: dict = field(default_factory=dict, compare=False, hash=False)
    full_answer: str | None = None

    @property
    def binary(self) -> bool:
        return self.answer.lower() in ("yes", "no")

    @property
    def family(self) -> str:
        return (self.types or {}).get("detailed") or ("binary" if self.binary else "open")


def _find_questions_file(root: Path) -> Path:
    f = root / QUESTIONS_FILE
    if f.is_file():
        return f
    cands = sorted(root.glob("*questions*.json"))
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise GQAFormatError(f"{root}: no {QUESTIONS_FILE} (or other *questions*.json) found")
    raise GQAFormatError(f"{root}: no {QUESTIONS_FILE} and several candidates {[c.name for c in cands]}; "
                         "pass questions_file=")


def _read_questions(qfile: Path) -> dict:
    """The questions file as a dict keyed by question id; a question id (or a question's field) given twice is
    an error: ``json`` would keep the last one silently."""
    if not qfile.is_file():
        raise GQAFormatError(f"{qfile}: questions file not found")
    twice = DuplicateKeys()
    try:
        data = json.loads(qfile.read_text(encoding="utf-8"), object_pairs_hook=twice)
    except json.JSONDecodeError as e:
        raise GQAFormatError(f"{qfile}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise GQAFormatError(f"{qfile}: expected a JSON object keyed by question id, got {type(data).__name__}")
    for obj, key in twice.found:
        if obj is data:
            raise GQAFormatError(f"{qfile}: question id {key!r} is given twice; keep one of the two entries")
        qid = next((q for q, entry in data.items() if entry is obj), None)
        if qid is not None:
            raise GQAFormatError(f"{qfile}: question {qid!r} gives the field {key!r} twice; keep one")
    return data


def _question(qfile: Path, qid: str, entry, images: dict[str, list[Path]], img_dir: Path) -> GQAQuestion:
    """One checked question; ``images`` maps each image id to the files with that stem."""
    if not isinstance(entry, dict):
        raise GQAFormatError(f"{qfile}: question {qid!r} is not an object")
    for key in ("imageId", "question", "answer"):
        if key not in entry:
            raise GQAFormatError(f"{qfile}: question {qid!r} has no {key!r} field")
        if not isinstance(entry[key], str) or (key != "answer" and not entry[key].strip()):
            raise GQAFormatError(f"{qfile}: question {qid!r}: field {key!r} must be a non-empty string, "
                                 f"got {entry[key]!r}")
    image_id = entry["imageId"]
    if image_id not in images:
        raise GQAFormatError(f"{qfile}: question {qid!r} refers to unknown imageId {image_id!r} "
                             f"(no {img_dir / image_id}{{{','.join(IMAGE_EXTENSIONS)}}})")
    path = one_file(images[image_id], f"{qfile}: question {qid!r}: imageId {image_id!r}", GQAFormatError)
    return GQAQuestion(str(qid), image_id, path, entry["question"], entry["answer"],
                       entry.get("types") or {}, entry.get("fullAnswer"))


def load_gqa(root: str | Path, questions_file: str | Path | None = None,
             images_dir: str | Path | None = None, limit: int | None = None) -> list[GQAQuestion]:
    """Load questions (sorted by question id) and check every referenced image exists, under one name only.

    Malformed input raises :class:`GQAFormatError` naming the file (and the question id).
    """
    root = Path(root)
    if not root.is_dir():
        raise GQAFormatError(f"{root}: GQA folder not found")
    qfile = Path(questions_file) if questions_file is not None else _find_questions_file(root)
    if not qfile.is_absolute() and not qfile.exists():
        qfile = root / qfile
    img_dir = Path(images_dir) if images_dir is not None else root / "images"
    data = _read_questions(qfile)
    if not img_dir.is_dir():
        raise GQAFormatError(f"{img_dir}: images folder not found (needed by {qfile})")
    images = files_by_stem(img_dir, IMAGE_EXTENSIONS)
    out = [_question(qfile, qid, data[qid], images, img_dir) for qid in sorted(data)[:limit]]
    if not out:
        raise GQAFormatError(f"{qfile}: no questions")
    return out


# --------------------------------------------------------------------------- scoring

def normalize_answer(text: str, normalization: str = "lmms-eval", *, is_prediction: bool = True) -> str:
    """Normalise a prediction or a reference before exact match.

    ``"lmms-eval"``: strip (predictions), lower-case, remove all ASCII punctuation.
    ``"llava"``: strip, drop every trailing "." (``rstrip('.')``), lower-case (LLaVA's convert_gqa_for_eval.py).
    """
    text = str(text)
    if normalization == "lmms-eval":
        if is_prediction:
            text = text.strip()
        return text.lower().translate(_PUNCT_TABLE)
    if normalization == "llava":
        if not is_prediction:
            return text
        return text.strip().rstrip(".").lower()
    raise ValueError(f"unknown normalization {normalization!r}")


def exact_match(prediction: str, reference: str, normalization: str = "lmms-eval") -> bool:
    return (normalize_answer(prediction, normalization, is_prediction=True)
            == normalize_answer(reference, normalization, is_prediction=False))


@dataclass
class GQAReport:
    accuracy: float                       # %
    n: int
    correct: int
    binary: float | None = None           # % on yes/no questions
    open: float | None = None             # % on the others
    by_family: "OrderedDict[str, tuple[float, int]]" = field(default_factory=OrderedDict)  # % and count

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "n": self.n, "correct": self.correct, "binary": self.binary,
                "open": self.open, "by_family": {k: {"accuracy": a, "n": n} for k, (a, n) in self.by_family.items()}}

    def format(self) -> str:
        lines = [f"GQA accuracy {self.accuracy:.2f}% ({self.correct}/{self.n})"]
        if self.binary is not None:
            lines.append(f"  binary {self.binary:.2f}%")
        if self.open is not None:
            lines.append(f"  open   {self.open:.2f}%")
        for k, (a, n) in self.by_family.items():
            lines.append(f"  {k:<10}{a:7.2f}% (n={n})")
        return "\n".join(lines)


def _pct(xs: list[bool]) -> float | None:
    return 100.0 * sum(xs) / len(xs) if xs else None


def score_gqa(questions: Sequence, predictions: Sequence[str], normalization: str = "lmms-eval") -> GQAReport:
    """Exact-match accuracy; ``questions`` are :class:`GQAQuestion` or dicts with ``answer``."""
    if len(questions) != len(predictions):
        raise ValueError(f"{len(questions)} questions but {len(predictions)} predictions")
    if not questions:
        raise ValueError("no questions to score")
    results, binary, open_, fam = [], [], [], OrderedDict()
    for q, p in zip(questions, predictions):
        ref = q.answer if isinstance(q, GQAQuestion) else q["answer"]
        ok = exact_match(p, ref, normalization)
        results.append(ok)
        (binary if ref.lower() in ("yes", "no") else open_).append(ok)
        family = q.family if isinstance(q, GQAQuestion) else (q.get("types") or {}).get("detailed")
        if family:
            fam.setdefault(family, []).append(ok)
    by_family = OrderedDict((k, (_pct(v), len(v))) for k, v in sorted(fam.items()))
    return GQAReport(_pct(results), len(results), sum(results), _pct(binary), _pct(open_), by_family)


def write_predictions(path: str | Path, questions: Sequence[GQAQuestion], predictions: Sequence[str]) -> Path:
    """Predictions file for the official ``eval.py``: ``[{"questionId", "prediction"}]`` (LLaVA-converted)."""
    path = Path(path)
    rows = [{"questionId": q.question_id, "prediction": normalize_answer(p, "llava")}
            for q, p in zip(questions, predictions)]
    path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the task, as the bench sees it

class GQATask(BenchTask):
    name = "gqa"
    prompt_benchmark = "gqa"
    folder_description = f"a GQA folder ({QUESTIONS_FILE} + images/)"
    synthetic_seed, synthetic_size, dev_size = GQA_SEED, 200, 100  # sizes: questions

    def detect(self, root: Path) -> int:
        """The release's question file beats a POPE folder (3); any ``*questions*.json`` loses to it."""
        if (root / QUESTIONS_FILE).is_file():
            return 4
        return 2 if any(root.glob("*questions*.json")) else 0

    def load(self, root: Path, limit: int | None) -> list:
        return load_gqa(root, limit=limit)

    def write_synthetic(self, folder: Path, seed: int, size: int) -> None:
        from ...embedded import synthetic

        synthetic.write_gqa(folder, seed=seed, n_questions=size)

    def metric(self, questions: Sequence) -> str:
        return "GQA accuracy (%)"

    def score(self, questions: Sequence, predictions: Sequence[str]) -> GQAReport:
        return score_gqa(questions, predictions)

    def headline(self, report: GQAReport) -> float:
        return float(report.accuracy)

    def write_predictions(self, folder: Path, questions: Sequence, predictions: Sequence[str]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_predictions(folder / "gqa_predictions.json", questions, predictions)

    def table_columns(self, results: dict) -> list[str]:
        return ["GQA %"]

    def table_cells(self, results: dict, score: dict) -> list[str]:
        return [cell(score["accuracy"], ".1f")]

    def csv_fields(self, score: dict) -> dict:
        return {"gqa_accuracy": score["accuracy"]}


TASK = GQATask()
