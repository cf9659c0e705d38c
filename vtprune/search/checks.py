"""The checks of a search's settings that need no model and write nothing; a problem is a one-line
:class:`~vtprune.cliargs.UsageError` (the storage's own checks are in :mod:`.storage`)."""

from __future__ import annotations

from pathlib import Path

from ..cliargs import UsageError, check_out_dir
from .plan import Plan, make_plan
from .settings import DEFAULT_CALIB, DEFAULT_TASKS, EMBEDDED, OBJECTIVES, SAMPLERS, Checked, SearchSettings
from .storage import check_existing_study, check_storage


def check_settings(s: SearchSettings, model_name: str | None = None) -> Checked:
    """Every check that needs no model; a problem is a one-line :class:`UsageError`. ``model_name``: the
    model's name when it is already loaded (default: ``s.model``, or the embedded tiny LLaVA's)."""
    from ..cliargs import check_model_spec

    if s.objective not in OBJECTIVES:
        raise UsageError(f"--objective {s.objective}: use flow (label-free) or accuracy (dev split)")
    for flag, value, low in (("--trials", s.trials, 1), ("--batch-size", s.batch_size, 1),
                             ("--max-new-tokens", s.max_new_tokens, 1)):
        if not isinstance(value, int) or value < low:
            raise UsageError(f"{flag} {value}: must be a whole number >= {low}")
    if s.calib is not None and (not isinstance(s.calib, int) or s.calib < 1):
        raise UsageError(f"--calib {s.calib}: must be a whole number >= 1")
    if s.timeout is not None and not s.timeout > 0:
        raise UsageError(f"--timeout {s.timeout}: must be > 0 seconds")
    check_sampler(s.sampler, s.pareto)
    plan = make_plan(s.method, s.keep, s.ratio, s.fixed, s.params)
    check_model_spec(s.model)
    _check_run_flags(s)
    tasks, data = _tasks(s)
    study = s.study or default_study_name(plan, s.objective, s.pareto)
    out = check_out_dir(s.out if s.out is not None else Path("out") / "search" / study)
    storage = s.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    if s.storage is not None:  # the default file goes into --out, which check_out_dir found writable
        check_storage(storage)
    calib = s.calib if s.calib is not None else (DEFAULT_CALIB if s.objective == "flow" else None)
    signature = {**plan.signature(), "objective": s.objective, "pareto": s.pareto,
                 "model": model_name or _model_key(s.model),
                 "tasks": tasks, "data": {t: str(Path(p).resolve()) for t, p in sorted(data.items())}, "calib": calib}
    check_existing_study(storage, study, signature)
    return Checked(plan, tasks, data, study, storage, out, calib, signature)


def _model_key(spec: str | None) -> str:
    """--model as part of a study's identity: a folder's absolute path, a hub id, or the embedded model."""
    if spec is None:
        return EMBEDDED
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.is_dir() else spec


def _check_run_flags(s: SearchSettings) -> None:
    import torch

    from ..eval.tasks.prompts import PROMPT_STYLES
    from ..loading import resolve_device, resolve_dtype

    resolve_device(s.device)
    try:
        resolve_dtype(s.dtype, torch.device("cpu"))
    except ValueError as err:
        raise UsageError(f"--dtype: {err}") from None
    if s.prompt_style not in PROMPT_STYLES:
        raise UsageError(f"--prompt-style {s.prompt_style}: use one of {', '.join(PROMPT_STYLES)}")


def check_sampler(name: str, pareto: bool) -> None:
    """A known sampler whose extra packages are installed."""
    import importlib.util

    if name not in SAMPLERS:
        raise UsageError(f"--sampler {name}: use tpe (default), gp or cmaes")
    if name == "gp" and importlib.util.find_spec("scipy") is None:
        raise UsageError("--sampler gp: optuna's GPSampler needs scipy, which is not installed; pip install scipy "
                         "(or use --sampler tpe)")
    if name == "cmaes":
        if pareto:
            raise UsageError("--sampler cmaes optimises one objective; use --sampler tpe (or gp) with --pareto")
        if importlib.util.find_spec("cmaes") is None:
            raise UsageError("--sampler cmaes: optuna's CmaEsSampler needs the cmaes package, which is not "
                             "installed; pip install cmaes (or use --sampler tpe)")


def _tasks(s: SearchSettings) -> tuple[list[str], dict]:
    """(tasks, task -> dev folder): --data folders as bench reads them; the shipped test sets are refused."""
    from ..eval.tasks import TASKS
    from .objectives import bench_test_dirs

    data = {}
    for task, folder in (s.data or {}).items():
        if task not in TASKS:
            raise UsageError(f"--data {task}={folder}: unknown task; use {', '.join(TASKS)}")
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise UsageError(f"--data {folder}: not a folder")
        if path.resolve() in bench_test_dirs():
            raise UsageError(f"--data {folder}: that is the bench's test split (the shipped synthetic {task} set); "
                             "leave --data out to tune on the synthetic dev split, or give a dev folder")
        data[task] = path
    tasks = list(s.tasks) if s.tasks else (list(data) if data else list(DEFAULT_TASKS))
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise UsageError(f"--task {','.join(bad) or tasks}: unknown task; use {', '.join(TASKS)}")
    other = sorted(set(data) - set(tasks))
    if other:
        raise UsageError(f"--data gives a {', '.join(other)} folder but --task is {','.join(tasks)}")
    return tasks, data


def default_study_name(plan: Plan, objective: str, pareto: bool) -> str:
    budget = "-".join(next((f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in b.items()), "schedule")
                      for b in plan.budgets)
    return f"{plan.label}-{budget}-{objective}" + ("-pareto" if pareto else "")
