"""POPE's scorer: every metric per category, pooled and as the category mean, under the LLaVA and lmms-eval
answer conventions (see :mod:`vtprune.eval.tasks.pope`)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

from ..mme import record_field
from .data import CATEGORIES

CONVENTIONS = ("llava", "lmms_eval")


def parse_lmms_eval(prediction: str) -> str:
    """lmms-eval ``pope_process_results``: ``"yes"``/``"no"`` only if the lower-cased, stripped text is exactly
    that, else ``"other"``."""
    p = str(prediction).lower().strip()
    return p if p in ("yes", "no") else "other"


def parse_llava(prediction: str) -> str:
    """LLaVA ``eval_pope.py``: first sentence, commas removed, split on spaces; ``No``/``no``/``not`` -> "no",
    anything else -> "yes"."""
    text = str(prediction)
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


_PARSERS = {"llava": parse_llava, "lmms_eval": parse_lmms_eval}


@dataclass(frozen=True)
class POPEMetrics:
    """Confusion counts of one group of questions ("yes" = positive); the metrics are properties, in %."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    other: int = 0          # answers that are neither yes nor no (lmms-eval convention only): never tp/fn

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn + self.other

    @property
    def accuracy(self) -> float:
        return 100.0 * (self.tp + self.tn) / self.n if self.n else 0.0

    @property
    def precision(self) -> float:
        return 100.0 * self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return 100.0 * self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def yes_ratio(self) -> float:
        """Share of *predicted* "yes" answers, in %."""
        return 100.0 * (self.tp + self.fp) / self.n if self.n else 0.0

    def add(self, other: "POPEMetrics") -> "POPEMetrics":
        return POPEMetrics(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn,
                           self.other + other.other)

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "precision": self.precision, "recall": self.recall, "f1": self.f1,
                "yes_ratio": self.yes_ratio, "n": self.n, "tp": self.tp, "fp": self.fp, "tn": self.tn,
                "fn": self.fn, "other": self.other}


METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


@dataclass
class POPEReport:
    """``conventions[convention][category]`` -> :class:`POPEMetrics`, for ``llava`` and ``lmms_eval``."""

    conventions: "OrderedDict[str, OrderedDict[str, POPEMetrics]]" = field(default_factory=OrderedDict)

    @property
    def categories(self) -> list[str]:
        first = next(iter(self.conventions.values()), {})
        return list(first)

    def all(self, convention: str = "llava") -> POPEMetrics:
        """Every question pooled (lmms-eval's ``pope`` task aggregates this way)."""
        total = POPEMetrics()
        for m in self.conventions[convention].values():
            total = total.add(m)
        return total

    def mean(self, convention: str = "llava") -> dict:
        """Each metric averaged over the categories present (the three-split average papers quote)."""
        per = list(self.conventions[convention].values())
        return {k: sum(getattr(m, k) for m in per) / len(per) for k in METRICS}

    @property
    def f1(self) -> float:
        """The headline number: LLaVA-convention F1, mean over the categories (%)."""
        return self.mean("llava")["f1"]

    def to_dict(self) -> dict:
        out = {"categories": self.categories, "n": self.all("llava").n}
        for conv, per in self.conventions.items():
            out[conv] = {"categories": {c: m.to_dict() for c, m in per.items()},
                         "all": self.all(conv).to_dict(), "mean": self.mean(conv)}
        return out

    def format(self) -> str:
        lines = [f"{'POPE':<14}{'conv':<11}" + "".join(f"{k:>11}" for k in METRICS)]
        for conv in self.conventions:
            rows = [(c, m.to_dict()) for c, m in self.conventions[conv].items()]
            rows += [("all", self.all(conv).to_dict()), ("mean", self.mean(conv))]
            for name, d in rows:
                lines.append(f"{name:<14}{conv:<11}" + "".join(f"{d[k]:11.2f}" for k in METRICS))
        return "\n".join(lines)


def _count(gt: str, pred: str) -> POPEMetrics:
    yes_gt = int(gt == "yes")
    if pred == "other":
        return POPEMetrics(other=1)
    if pred == "yes":
        return POPEMetrics(tp=yes_gt, fp=1 - yes_gt)
    return POPEMetrics(tn=1 - yes_gt, fn=yes_gt)


def score_pope(questions: Sequence, predictions: Sequence[str]) -> POPEReport:
    """Score predictions (same order as ``questions``) under both conventions, per category.

    ``questions`` are :class:`POPEQuestion` objects or dicts with ``answer`` (or ``label``) and ``category``.
    """
    if len(questions) != len(predictions):
        raise ValueError(f"{len(questions)} questions but {len(predictions)} predictions")
    if not questions:
        raise ValueError("no questions to score")
    per: dict[str, dict[str, POPEMetrics]] = {conv: {} for conv in CONVENTIONS}
    for q, pred in zip(questions, predictions):
        gt = str(record_field(q, "answer", "label", benchmark="POPE")).lower().strip()
        if gt not in ("yes", "no"):
            raise ValueError(f"POPE ground truth must be yes or no, got {gt!r}")
        category = str(record_field(q, "category", benchmark="POPE"))
        for conv, parse in _PARSERS.items():
            d = per[conv]
            d[category] = d.get(category, POPEMetrics()).add(_count(gt, parse(pred)))
    order = [c for c in CATEGORIES if c in per["llava"]] + sorted(c for c in per["llava"] if c not in CATEGORIES)
    return POPEReport(OrderedDict((conv, OrderedDict((c, per[conv][c]) for c in order)) for conv in CONVENTIONS))


