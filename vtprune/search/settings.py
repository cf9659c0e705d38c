"""A search's settings and results: what ``vtprune search`` takes (:class:`SearchSettings`), the settings after
the model-free checks (:class:`Checked`) and what a search leaves (:class:`SearchResult`). Data only: the checks
are in :mod:`.checks`, the driver in :mod:`.study`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .plan import Plan

OBJECTIVES = ("flow", "accuracy")
SAMPLERS = ("tpe", "gp", "cmaes")
DEFAULT_TASKS = ("mme", "gqa")
DEFAULT_CALIB = 30  # VFlowOpt's 30 samples
EMBEDDED = "tiny-llava"  # the model name configs get for the embedded tiny LLaVA


@dataclass
class SearchSettings:
    """Everything ``vtprune search`` takes (the CLI flags map onto these fields)."""

    model: str | None = None  # local folder or hub id; None = the embedded tiny LLaVA
    method: str | Sequence[str] = "vflowopt"  # a name, "a,b" or a list: a pipeline
    keep: int | Sequence | None = None  # the budget: one value, or one per pipeline method (None: none)
    ratio: float | Sequence | None = None
    objective: str = "flow"
    trials: int = 30  # finished trials in the study
    data: dict = field(default_factory=dict)  # task -> dev folder (default: the synthetic dev sets)
    tasks: Sequence[str] | None = None  # tasks scored / calibrated on (default: mme, gqa or the --data ones)
    study: str | None = None  # default: <methods>-<budget>-<objective>[-pareto]
    storage: str | None = None  # default: sqlite:///<out>/study.db
    out: str | os.PathLike | None = None  # default: out/search/<study>
    pareto: bool = False  # objective vs measured prefill time
    calib: int | None = None  # flow: samples (30); accuracy: questions per task (all)
    sampler: str = "tpe"
    timeout: float | None = None  # seconds for this worker
    seed: int = 0
    fixed: dict = field(default_factory=dict)  # fields not searched ({"layer": 3}; pipelines: "fastv.layer")
    params: Sequence[str] | str | None = None  # search only these (prefixed) fields
    batch_size: int = 8
    max_new_tokens: int = 8
    prompt_style: str = "llava_v1"
    dtype: str = "auto"
    device: str = "auto"
    progress: bool = True


@dataclass
class SearchResult:
    """What a search leaves: the study, the best configuration (a config mapping) and the files written."""

    study: str
    storage: str
    out: Path
    finished: int
    running: int = 0  # trials other workers were still running when this one wrote its outputs
    best: dict | None = None
    best_value: float | None = None
    best_trial: int | None = None
    defaults_value: float | None = None
    front: list = field(default_factory=list)  # --pareto: [{"trial", "value", "prefill_ms", "config"}]
    files: dict = field(default_factory=dict)
    interrupted: bool = False


@dataclass
class Checked:
    """A search's settings after the model-free checks."""

    plan: Plan
    tasks: list[str]
    data: dict
    study: str
    storage: str
    out: Path
    calib: int | None
    signature: dict
