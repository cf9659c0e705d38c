"""The optuna driver behind ``vtprune search``: settings, checks, storage, trials, resuming, several workers.

One study per (methods, budget, objective, model, data): a local SQLite file in ``--out`` by default, or any
RDB URL, so rerunning a command continues its study and several workers (processes or machines) can share
one. ``--trials N`` is the number of *finished* trials in the study (completed, pruned, or failed with an error
the configuration raised), whoever ran them:

* every trial records its worker (host:pid); a worker starting on a study fails the RUNNING trials of dead
  processes on its host (a killed run), optuna's heartbeat fails those of other hosts after a grace period,
  and an interrupted trial does not count;
* a trial that starts when N trials are already finished or running elsewhere is dropped (``skipped``), so
  racing workers stop at N, never N + 1;
* trial 0 is the method's defaults (enqueued once per study; a second copy is skipped).

Modules: :mod:`.settings` (settings and result types), :mod:`.checks` (model-free checks), :mod:`.storage`
(storage URL, study, sampler, pruner), :mod:`.trials` (counting, claiming, the objective), :mod:`.loop` (the
trials loop, Ctrl-C, progress); this module runs them (:func:`run_search`, :func:`search`) and re-exports their
names for existing imports.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from .._parts import getattr_from_parts
from ..cliargs import UsageError, check_prune
from .checks import check_sampler, check_settings, default_study_name
from .loop import MAX_ERRORS_IN_A_ROW, Progress, _optimize, stop_on_interrupt
from .plan import Plan
from .settings import (DEFAULT_CALIB, DEFAULT_TASKS, EMBEDDED, OBJECTIVES, SAMPLERS, Checked, SearchResult,
                       SearchSettings)
from .storage import (GRACE_S, HEARTBEAT_S, WORKER, _quiet_optuna, check_existing_study, check_storage,
                      legacy_constraints, make_pruner, make_sampler, make_storage, open_study)
from .trials import counts, ensure_defaults, finished, make_objective, reap_dead

__all__ = ["SearchSettings", "SearchResult", "Checked", "run_search", "search", "loaded_name", "check_settings",
           "check_sampler", "default_study_name", "check_storage", "check_existing_study", "open_study",
           "make_storage", "make_sampler", "make_pruner", "legacy_constraints", "counts", "finished", "reap_dead",
           "ensure_defaults", "make_objective", "stop_on_interrupt", "Progress", "OBJECTIVES", "SAMPLERS",
           "DEFAULT_TASKS", "DEFAULT_CALIB", "EMBEDDED", "HEARTBEAT_S", "GRACE_S", "MAX_ERRORS_IN_A_ROW", "WORKER"]

# the modules this one was split into: private names (``study._claim``) are still found there
_PARTS = ("settings", "checks", "storage", "trials", "loop")

__getattr__ = getattr_from_parts(__name__, __package__, _PARTS)


def run_search(settings: SearchSettings, *, model=None, processor=None, prog: str = "vtprune search") -> SearchResult:
    """Check, load the model (unless given), build the objective, run trials until the study has
    ``settings.trials`` finished ones (or the timeout, or Ctrl-C), write the outputs; see the module doc."""
    from ..adapters import get_adapter
    from ..loading import load_model
    from ..core.plan import model_info

    model_name = loaded_name(model) if model is not None else None
    checked = check_settings(settings, model_name)
    from .objectives import dev_tasks

    tasks = dev_tasks(checked.tasks, checked.data)  # a malformed --data folder: one line, before the model loads
    if model is None:
        model, processor, desc = load_model(settings.model, settings.dtype, settings.device)
        model_name = desc["name"]
    try:
        info = model_info(get_adapter(model))
    except TypeError as err:
        raise UsageError(f"--model {settings.model}: {err}") from None
    space = checked.plan.space(info)
    _check_on_model(model, checked.plan, info)
    objective = _build_objective(settings, checked, model, processor, model_name, tasks)
    with _quiet_optuna():
        study, _ = open_study(checked, settings)
        return _optimize(study, settings, checked, space, objective, model, model_name, prog)


def loaded_name(model) -> str:
    """A loaded model's name for configs: its folder or hub id (the embedded model: tiny-llava)."""
    from ..embedded.tiny_llava import DEFAULT_ASSET_DIR

    name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    return EMBEDDED if Path(name).resolve() == DEFAULT_ASSET_DIR.resolve() else name


def _check_on_model(model, plan: Plan, info) -> None:
    """The budget fits the model and the defaults install on it (prune, then unprune: nothing runs)."""
    for budget in plan.budgets:
        if budget.get("keep") is not None and budget["keep"] > info.nominal_tokens:
            raise UsageError(f"--keep {budget['keep']}: more than the {info.nominal_tokens} visual tokens an image "
                             f"has for this model; use --keep <= {info.nominal_tokens}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_prune(model, plan.methods(None))
    except UsageError as err:
        raise UsageError(f"--method {plan.label}: its defaults do not install on this model ({err})") from None


def _build_objective(settings, checked: Checked, model, processor, model_name: str, tasks: list):
    from . import objectives as obj

    if settings.objective == "accuracy":
        if checked.calib is not None:
            tasks = [_first(t, checked.calib) for t in tasks]
        timing = _timing(model, processor, tasks, settings) if settings.pareto else ()
        return obj.AccuracyObjective(model, processor, tasks, settings.batch_size, settings.max_new_tokens,
                                     settings.prompt_style, timing)
    batches, ids = obj.calibration_inputs(model, processor, tasks, checked.calib, settings.batch_size,
                                          settings.prompt_style)
    reference = _reference(model, batches, ids, checked, settings, model_name)
    timing = obj.single_inputs(batches, obj.TIMING_SAMPLES) if settings.pareto else ()
    return obj.FlowObjective(model, batches, reference, timing)


def _first(task, n: int):
    """The first ``n`` questions of a task, picked as the bench's --limit picks them (MME: whole images)."""
    from ..eval.data import TaskData

    return TaskData(task.name, task.root, task.task.limit(task.questions, n))


def _timing(model, processor, tasks, settings) -> list:
    from . import objectives as obj

    batches, _ = obj.calibration_inputs(model, processor, tasks, obj.TIMING_SAMPLES, 1, settings.prompt_style)
    return batches


def _reference(model, batches, ids, checked: Checked, settings, model_name: str):
    """The unpruned states, cached in ``--out`` under a key of everything they depend on."""
    import hashlib
    import json

    import torch

    from . import objectives as obj

    key = {"model": model_name, "parameters": int(sum(p.numel() for p in model.parameters())),
           "dtype": str(next(model.parameters()).dtype), "device": next(model.parameters()).device.type,
           "samples": ids, "batch_size": settings.batch_size, "prompt_style": settings.prompt_style}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = checked.out / f"flow-reference-{digest}.pt"
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        if cached.get("key") == json.dumps(key, sort_keys=True):
            return cached["states"]
    states = obj.final_states(model, batches)
    checked.out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"key": json.dumps(key, sort_keys=True), "states": states}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent worker reads a whole file or none
    return states


def search(**kwargs) -> SearchResult:
    """``vtprune.search(...)``: :class:`SearchSettings` fields as keywords, plus ``model=`` a loaded model
    (with ``processor=``) instead of a path; see :func:`run_search`."""
    loaded = kwargs.get("model")
    model = processor = None
    if loaded is not None and not isinstance(loaded, (str, os.PathLike)):
        model, processor = kwargs.pop("model"), kwargs.pop("processor", None)
        if processor is None:
            raise UsageError("search(model=<loaded model>) needs processor= too (or pass the model's folder)")
    unknown = sorted(set(kwargs) - set(SearchSettings.__dataclass_fields__))
    if unknown:
        raise UsageError(f"search(): unknown argument(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(SearchSettings.__dataclass_fields__)}")
    return run_search(SearchSettings(**kwargs), model=model, processor=processor)
