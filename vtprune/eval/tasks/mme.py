"""MME: loader for the release folder layout and the official scoring rule.

Layout (``MME_Benchmark_release_version``): one folder per subtask.  For ``artwork``,
``celebrity``, ``landmark``, ``posters`` and ``scene`` the images are in ``images/`` and
the per-image question files in ``questions_answers_YN/``; for the other nine subtasks
the images and ``.txt`` files sit side by side.  Every ``.txt`` holds exactly two lines
``question<TAB>answer`` with answer ``Yes`` or ``No``.

Scoring (official ``eval_tool/calculation.py`` == lmms-eval ``mme`` task):

* a prediction is lower-cased, stripped and its periods removed; ``yes``/``no`` map to
  themselves, a single ``y``/``n`` to yes/no, otherwise ``yes`` or ``no`` found in the
  first 4 characters, else ``other`` (which is always wrong);
* per subtask: ``acc`` = % of questions right, ``acc+`` = % of images with both
  questions right, score = acc + acc+ (max 200);
* Perception = sum over the perception subtasks present (max 2000 with all 10),
  Cognition = sum over the cognition subtasks present (max 800 with all 4).

The results-folder format of the official eval tool (``<subtask>.txt`` with lines
``image<TAB>question<TAB>ground truth<TAB>prediction``, an image's two lines
consecutive) is supported by :func:`write_results_dir` / :func:`read_results_dir`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ...embedded.synthetic.scenes import MME_SEED
from .base import BenchTask, aligned, cell
from .datachecks import files_by_stem, one_file

__all__ = [
    "PERCEPTION_SUBTASKS",
    "COGNITION_SUBTASKS",
    "IMAGES_SUBFOLDER_SUBTASKS",
    "MMEFormatError",
    "MMEQuestion",
    "MMESubtaskScore",
    "MMEReport",
    "load_mme",
    "parse_yes_no",
    "score_mme",
    "write_results_dir",
    "read_results_dir",
    "limit_mme",
    "MMETask",
    "TASK",
]

PERCEPTION_SUBTASKS = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                       "landmark", "artwork", "OCR")
COGNITION_SUBTASKS = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGES_SUBFOLDER_SUBTASKS = ("artwork", "celebrity", "landmark", "posters", "scene")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
SUBTASK_MAX = 200.0


class MMEFormatError(ValueError):
    """A malformed MME folder or results file; the message names the offending file."""


@dataclass(frozen=True)
class MMEQuestion:
    subtask: str
    image_name: str         # image file name, e.g. "0001.png"
    image_path: Path
    question: str           # as stored, including " Please answer yes or no."
    answer: str             # "Yes" or "No"
    index: int = 0          # 0 or 1: line of the question in its .txt

    @property
    def question_id(self) -> str:
        """lmms-eval's grouping key: ``<subtask>/<image file>``."""
        return f"{self.subtask}/{self.image_name}"

    @property
    def category(self) -> str:
        return "perception" if self.subtask in PERCEPTION_SUBTASKS else (
            "cognition" if self.subtask in COGNITION_SUBTASKS else "other")


# --------------------------------------------------------------------------- loading

def _subtask_dirs(root: Path) -> tuple[Path, Path]:
    """(image dir, question-file dir) for one subtask folder."""
    if (root / "images").is_dir() and (root / "questions_answers_YN").is_dir():
        return root / "images", root / "questions_answers_YN"
    if (root / "images").is_dir() or (root / "questions_answers_YN").is_dir():
        missing = "questions_answers_YN" if (root / "images").is_dir() else "images"
        raise MMEFormatError(f"{root}: has only one of images/ and questions_answers_YN/ (missing {root / missing})")
    return root, root


def _read_question_file(txt: Path, subtask: str, image: Path) -> list[MMEQuestion]:
    try:
        raw = txt.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MMEFormatError(f"{txt}: not UTF-8 text ({e})") from None
    lines = [ln.rstrip("\r") for ln in raw.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != 2:
        raise MMEFormatError(f"{txt}: expected 2 lines 'question<TAB>Yes|No', found {len(lines)}")
    out = []
    for i, line in enumerate(lines):
        if "\t" not in line:
            raise MMEFormatError(f"{txt}: line {i + 1} has no TAB between question and answer: {line!r}")
        question, answer = line.rsplit("\t", 1)
        answer = answer.strip()
        if answer not in ("Yes", "No"):
            raise MMEFormatError(f"{txt}: line {i + 1}: answer must be 'Yes' or 'No', got {answer!r}")
        if not question.strip():
            raise MMEFormatError(f"{txt}: line {i + 1}: empty question")
        out.append(MMEQuestion(subtask, image.name, image, question.strip(), answer, i))
    return out


def load_mme(root: str | Path, subtasks: Sequence[str] | None = None) -> list[MMEQuestion]:
    """Load an MME release-layout folder; questions come back sorted by subtask folder then image name.

    ``subtasks`` restricts loading to those folder names (an unknown name is an error).
    Any malformed input raises :class:`MMEFormatError` naming the file (both files for two images of one stem).
    """
    root = Path(root)
    if not root.is_dir():
        raise MMEFormatError(f"{root}: MME folder not found")
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subtasks is None:
        chosen = present
    else:
        missing = [s for s in subtasks if s not in present]
        if missing:
            raise MMEFormatError(f"{root}: no subtask folder(s) {missing}; found {present}")
        chosen = list(subtasks)
    questions: list[MMEQuestion] = []
    for name in chosen:
        img_dir, qa_dir = _subtask_dirs(root / name)
        images = {stem: one_file(paths, str(img_dir / stem), MMEFormatError)  # 0001.png beside 0001.jpg
                  for stem, paths in files_by_stem(img_dir, IMAGE_EXTENSIONS).items()}
        txts = {p.stem: p for p in sorted(qa_dir.iterdir()) if p.is_file() and p.suffix == ".txt"}
        if not images and not txts:
            continue  # an unrelated folder (e.g. eval_tool/) -- nothing to load
        for stem, img in images.items():
            if stem not in txts:
                raise MMEFormatError(f"{img}: image has no question file (expected {qa_dir / (stem + '.txt')})")
        for stem, txt in txts.items():
            if stem not in images:
                raise MMEFormatError(f"{txt}: question file has no image "
                                     f"(expected {img_dir / stem}{{{','.join(IMAGE_EXTENSIONS)}}})")
            qs = _read_question_file(txt, name, images[stem])
            questions.extend(qs)
    if not questions:
        raise MMEFormatError(f"{root}: no MME subtask folders with images and .txt files found")
    return questions


# --------------------------------------------------------------------------- scoring

def parse_yes_no(prediction: str) -> str:
    """The official / lmms-eval MME answer parser: returns "yes", "no" or "other"."""
    p = str(prediction).lower().strip().replace(".", "")
    if p in ("yes", "no"):
        return p
    if len(p) == 1:
        return {"y": "yes", "n": "no"}.get(p, "other")
    head = p[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


@dataclass
class MMESubtaskScore:
    subtask: str
    acc: float              # %
    acc_plus: float         # %
    n_questions: int
    n_images: int
    n_other: int            # predictions parsed as "other"

    @property
    def score(self) -> float:
        return self.acc + self.acc_plus


@dataclass
class MMEReport:
    subtasks: "OrderedDict[str, MMESubtaskScore]" = field(default_factory=OrderedDict)

    def _total(self, names: Iterable[str]) -> float | None:
        present = [self.subtasks[n].score for n in names if n in self.subtasks]
        return sum(present) if present else None

    @property
    def perception(self) -> float | None:
        """Sum of the perception subtask scores present (None if none present)."""
        return self._total(PERCEPTION_SUBTASKS)

    @property
    def cognition(self) -> float | None:
        return self._total(COGNITION_SUBTASKS)

    @property
    def perception_max(self) -> float:
        return SUBTASK_MAX * sum(n in self.subtasks for n in PERCEPTION_SUBTASKS)

    @property
    def cognition_max(self) -> float:
        return SUBTASK_MAX * sum(n in self.subtasks for n in COGNITION_SUBTASKS)

    @property
    def total(self) -> float:
        """Perception + Cognition (subtasks outside both lists are not counted)."""
        return (self.perception or 0.0) + (self.cognition or 0.0)

    @property
    def total_max(self) -> float:
        return self.perception_max + self.cognition_max

    @property
    def total_percent(self) -> float:
        return 100.0 * self.total / self.total_max if self.total_max else 0.0

    def to_dict(self) -> dict:
        return {
            "subtasks": {k: {"acc": v.acc, "acc_plus": v.acc_plus, "score": v.score,
                             "n_questions": v.n_questions, "n_images": v.n_images, "n_other": v.n_other}
                         for k, v in self.subtasks.items()},
            "perception": self.perception, "perception_max": self.perception_max,
            "cognition": self.cognition, "cognition_max": self.cognition_max,
            "total": self.total, "total_max": self.total_max,
        }

    def format(self) -> str:
        lines = [f"{'subtask':<24}{'acc':>8}{'acc+':>8}{'score':>8}"]
        for k, v in self.subtasks.items():
            lines.append(f"{k:<24}{v.acc:8.2f}{v.acc_plus:8.2f}{v.score:8.2f}")
        if self.perception is not None:
            lines.append(f"{'MME Perception':<24}{'':16}{self.perception:8.2f}  / {self.perception_max:.0f}")
        if self.cognition is not None:
            lines.append(f"{'MME Cognition':<24}{'':16}{self.cognition:8.2f}  / {self.cognition_max:.0f}")
        if self.perception is not None and self.cognition is not None:
            lines.append(f"{'MME Perception+Cognition':<24}{'':16}{self.total:8.2f}  / {self.total_max:.0f}")
        return "\n".join(lines)


def record_field(q, *names, benchmark: str = "MME"):
    """The first of ``names`` that a question record (a dict or an object) has; KeyError naming them otherwise."""
    for name in names:
        if isinstance(q, dict):
            if name in q:
                return q[name]
        elif hasattr(q, name):
            return getattr(q, name)
    raise KeyError(f"{benchmark} record {q!r} has none of the fields {names}")


def _key(q) -> tuple[str, str, str]:
    """(subtask, image key, ground truth) of an MMEQuestion or a dict (lmms-eval names accepted)."""
    return record_field(q, "subtask", "category"), record_field(q, "image_name", "question_id"), record_field(q, "answer")


def score_mme(questions: Sequence, predictions: Sequence[str]) -> MMEReport:
    """Score predictions (same order as ``questions``) exactly as the official tool / lmms-eval.

    ``questions`` are :class:`MMEQuestion` objects or dicts with ``subtask``/``category``,
    ``image_name``/``question_id`` and ``answer``.  Every image must have exactly two
    questions (lmms-eval asserts this), else ``ValueError``.
    """
    if len(questions) != len(predictions):
        raise ValueError(f"{len(questions)} questions but {len(predictions)} predictions")
    by_task: "OrderedDict[str, OrderedDict[str, list[tuple[bool, bool]]]]" = OrderedDict()
    for q, pred in zip(questions, predictions):
        subtask, image, gt = _key(q)
        parsed = parse_yes_no(pred)
        gt_norm = str(gt).lower().strip().replace(".", "")
        by_task.setdefault(subtask, OrderedDict()).setdefault(image, []).append((parsed == gt_norm, parsed == "other"))
    report = MMEReport()
    order = [s for s in PERCEPTION_SUBTASKS + COGNITION_SUBTASKS if s in by_task] + \
            [s for s in by_task if s not in PERCEPTION_SUBTASKS + COGNITION_SUBTASKS]
    for subtask in order:
        images = by_task[subtask]
        for image, res in images.items():
            if len(res) != 2:
                raise ValueError(f"MME {subtask}/{image}: expected 2 questions per image, got {len(res)}")
        n_q = sum(len(r) for r in images.values())
        correct = sum(ok for r in images.values() for ok, _ in r)
        both = sum(all(ok for ok, _ in r) for r in images.values())
        other = sum(o for r in images.values() for _, o in r)
        report.subtasks[subtask] = MMESubtaskScore(subtask, 100.0 * correct / n_q, 100.0 * both / len(images),
                                                   n_q, len(images), other)
    return report


# --------------------------------------------------------------------------- official results-folder format

def write_results_dir(out_dir: str | Path, questions: Sequence[MMEQuestion], predictions: Sequence[str]) -> Path:
    """Write ``<subtask>.txt`` files readable by the official ``eval_tool/calculation.py``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per: "OrderedDict[str, list[str]]" = OrderedDict()
    for q, p in zip(questions, predictions):
        clean = " ".join(str(p).split())  # no TABs / newlines inside a field
        per.setdefault(q.subtask, []).append(f"{q.image_name}\t{q.question}\t{q.answer}\t{clean}")
    for subtask, lines in per.items():
        (out_dir / f"{subtask}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out_dir


def read_results_dir(results_dir: str | Path) -> tuple[list[dict], list[str]]:
    """Read an official-format results folder -> (question dicts, predictions) for :func:`score_mme`."""
    results_dir = Path(results_dir)
    files = sorted(results_dir.glob("*.txt"))
    if not files:
        raise MMEFormatError(f"{results_dir}: no <subtask>.txt results files")
    qs, preds = [], []
    for f in files:
        lines = [ln for ln in f.read_text(encoding="utf-8").split("\n") if ln.strip()]
        if len(lines) % 2:
            raise MMEFormatError(f"{f}: odd number of lines ({len(lines)}); each image needs 2 consecutive lines")
        for i, ln in enumerate(lines):
            parts = ln.split("\t")
            if len(parts) != 4:
                raise MMEFormatError(f"{f}: line {i + 1}: expected 4 TAB-separated fields "
                                     f"(image, question, ground truth, prediction), got {len(parts)}")
            image, question, gt, pred = parts
            if gt not in ("Yes", "No"):
                raise MMEFormatError(f"{f}: line {i + 1}: ground truth must be 'Yes' or 'No', got {gt!r}")
            if i % 2 and lines[i - 1].split("\t")[0] != image:
                raise MMEFormatError(f"{f}: lines {i} and {i + 1} should be the two questions of one image "
                                     f"but name {lines[i - 1].split(chr(9))[0]!r} and {image!r}")
            qs.append({"subtask": f.stem, "image_name": image, "question": question, "answer": gt})
            preds.append(pred)
    return qs, preds


# --------------------------------------------------------------------------- the task, as the bench sees it

def limit_mme(questions: Sequence, limit: int | None) -> list:
    """The first ``ceil(limit / 2)`` images taken round-robin over subtasks (both questions of each image, so
    acc+ stays defined), in the loader's order."""
    if limit is None:
        return list(questions)
    images: dict[str, list[tuple[int, str]]] = {}
    for i, q in enumerate(questions):
        keys = images.setdefault(q.subtask, [])
        if not keys or keys[-1][1] != q.image_name:
            keys.append((i, q.image_name))
    want = (limit + 1) // 2
    chosen: set[tuple[str, str]] = set()
    queues = [list(v) for v in images.values()]
    depth = 0
    while len(chosen) < want and any(depth < len(qs) for qs in queues):
        for subtask, qs in zip(images, queues):
            if depth < len(qs) and len(chosen) < want:
                chosen.add((subtask, qs[depth][1]))
        depth += 1
    return [q for q in questions if (q.subtask, q.image_name) in chosen]


class MMETask(BenchTask):
    name = "mme"
    prompt_benchmark = "mme"
    folder_description = "an MME release folder (one folder per subtask)"
    synthetic_seed, synthetic_size, dev_size = MME_SEED, 30, 10  # sizes: images per subtask

    def detect(self, root: Path) -> int:
        return int(any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()))

    def load(self, root: Path, limit: int | None) -> list:
        return limit_mme(load_mme(root), limit)

    def limit(self, questions: Sequence, limit: int | None) -> list:
        return limit_mme(questions, limit)

    def write_synthetic(self, folder: Path, seed: int, size: int) -> None:
        from ...embedded import synthetic

        synthetic.write_mme(folder, seed=seed, per_subtask=size)

    def metric(self, questions: Sequence) -> str:
        cognition = any(q.subtask in COGNITION_SUBTASKS for q in questions)
        return "MME Perception+Cognition" if cognition else "MME Perception"

    def units(self, questions: Sequence) -> list[list[int]]:
        """Both questions of an image together, images round-robin over the subtasks."""
        groups: dict[str, dict[str, list[int]]] = {}
        for i, q in enumerate(questions):
            groups.setdefault(q.subtask, {}).setdefault(q.image_name, []).append(i)
        queues = [list(images.values()) for images in groups.values()]
        out, depth = [], 0
        while any(depth < len(q) for q in queues):
            out += [q[depth] for q in queues if depth < len(q)]
            depth += 1
        return out

    def prediction_ids(self, questions: Sequence) -> list[str]:
        return [f"{q.question_id}#{q.index}" for q in questions]

    def training_answer(self, question) -> str:
        return question.answer.lower()

    def score(self, questions: Sequence, predictions: Sequence[str]) -> MMEReport:
        return score_mme(questions, predictions)

    def headline(self, report: MMEReport) -> float:
        """Perception + Cognition of the subtasks present."""
        return float(report.total)

    def percent(self, report: MMEReport) -> float:
        return 100.0 * float(report.total) / report.total_max if report.total_max else 0.0

    def write_predictions(self, folder: Path, questions: Sequence, predictions: Sequence[str]) -> None:
        write_results_dir(folder / "mme", questions, predictions)

    def table_columns(self, results: dict) -> list[str]:
        has_p, has_c = _parts_present(results)
        first = results["runs"][0]["scores"].get("mme", {})
        return ([f"MME-P/{first['perception_max']:.0f}"] if has_p else []) + \
               ([f"MME-C/{first['cognition_max']:.0f}"] if has_c else [])

    def table_cells(self, results: dict, score: dict) -> list[str]:
        has_p, has_c = _parts_present(results)
        return [cell(score[part], ".1f") for part, shown in (("perception", has_p), ("cognition", has_c)) if shown]

    def csv_fields(self, score: dict) -> dict:
        row = {"mme_perception": score["perception"], "mme_cognition": score["cognition"], "mme_total": score["total"]}
        for name, s in score["subtasks"].items():
            row.update({f"mme_{name}_acc": s["acc"], f"mme_{name}_acc_plus": s["acc_plus"],
                        f"mme_{name}_score": s["score"]})
        return row

    def detail_lines(self, results: dict) -> list[str]:
        subtasks = list(results["runs"][0]["scores"]["mme"]["subtasks"])
        rows = [[r["label"]] + [f"{r['scores']['mme']['subtasks'][s]['score']:.1f}" for s in subtasks]
                for r in results["runs"] if not r.get("error")]
        return ["", "MME subtask score (acc + acc+, max 200 each):"] + aligned([["config"] + subtasks] + rows)

    def plot_title(self, results: dict) -> str:
        return super().plot_title(results) + f" (max {results['runs'][0]['scores']['mme']['total_max']:.0f})"


def _parts_present(results: dict) -> tuple[bool, bool]:
    """Whether any run has perception / cognition subtasks: the table's MME columns."""
    scores = [r["scores"]["mme"] for r in results["runs"] if "mme" in r["scores"]]
    return any(s["perception"] is not None for s in scores), any(s["cognition"] is not None for s in scores)


TASK = MMETask()
