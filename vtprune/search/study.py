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
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..cliargs import UsageError, check_out_dir, check_prune
from ..errors import ConfigError, PruneError
from .plan import Plan, describe, make_plan

OBJECTIVES = ("flow", "accuracy")
SAMPLERS = ("tpe", "gp", "cmaes")
DEFAULT_TASKS = ("mme", "gqa")
DEFAULT_CALIB = 30  # VFlowOpt's 30 samples
HEARTBEAT_S, GRACE_S = 10, 60  # optuna heartbeat: a trial silent for GRACE_S is failed (a dead remote worker)
MAX_ERRORS_IN_A_ROW = 10
EMBEDDED = "tiny-llava"  # the model name configs get for the embedded tiny LLaVA
WORKER = f"{socket.gethostname()}:{os.getpid()}"


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


# ------------------------------------------------------------------------------------------------------------
# checks (no model, nothing written)
def check_settings(s: SearchSettings, model_name: str | None = None) -> Checked:
    """Every check that needs no model; a problem is a one-line :class:`UsageError`. ``model_name``: the
    model's name when it is already loaded (default: ``s.model``, or the embedded tiny LLaVA's)."""
    from ..benchmarks.runner import check_model_spec

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

    from ..benchmarks.prompts import PROMPT_STYLES
    from ..benchmarks.runner import resolve_device, resolve_dtype

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
    from ..benchmarks.runner import TASKS
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


def _safe_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for messages
        return url


def check_storage(url: str) -> None:
    """The storage URL can be opened, without creating anything: an SQLite file's folder exists and is
    writable (an existing file is a database), other URLs have a driver and a server that answers."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    shown = _safe_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UsageError(f"--storage {shown}: not a database URL; use e.g. sqlite:///study.db or "
                         "postgresql://user:password@host/db") from None
    if parsed.get_backend_name() == "sqlite":
        return _check_sqlite(parsed.database, shown)
    try:
        parsed.get_dialect()
    except (NoSuchModuleError, ImportError) as err:
        raise UsageError(f"--storage {shown}: no database driver for {parsed.drivername!r} ({err}); install it, "
                         "e.g. pip install psycopg2-binary for PostgreSQL") from None
    try:
        engine = create_engine(parsed, connect_args=_connect_timeout(parsed.get_backend_name()))
    except ImportError as err:
        raise UsageError(f"--storage {shown}: no database driver for {parsed.drivername!r} ({err}); install it, "
                         "e.g. pip install psycopg2-binary for PostgreSQL") from None
    try:
        with engine.connect():
            pass
        engine.dispose()
    except Exception as err:  # noqa: BLE001 - every driver has its own errors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--storage {shown}: cannot connect ({first})") from None


def _connect_timeout(backend: str) -> dict:
    return {"connect_timeout": 10} if backend in ("postgresql", "mysql") else {}


def _check_sqlite(database: str | None, shown: str) -> None:
    import sqlite3

    if not database or database == ":memory:" or database.startswith("file::memory:"):
        raise UsageError(f"--storage {shown}: an in-memory SQLite database cannot be resumed or shared; "
                         "give a file, e.g. sqlite:///study.db")
    path = Path(database).expanduser()
    if path.is_dir():
        raise UsageError(f"--storage {shown}: {path} is a folder; give a database file in it")
    if path.exists():
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                db.execute("select name from sqlite_master limit 1").fetchall()
        except sqlite3.DatabaseError as err:
            raise UsageError(f"--storage {shown}: {path} cannot be opened as an SQLite database ({err})") from None
        return
    if not path.parent.is_dir():
        raise UsageError(f"--storage {shown}: folder {path.parent} does not exist; create it or give another path")
    if not os.access(path.parent, os.W_OK):
        raise UsageError(f"--storage {shown}: folder {path.parent} is not writable; give another path")


def _storage_exists(url: str) -> bool:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return parsed.get_backend_name() != "sqlite" or Path(parsed.database).expanduser().exists()


def check_existing_study(url: str, name: str, signature: dict) -> None:
    """A study of that name already in the storage must be the same search (methods, budget, objective, ...)."""
    if not _storage_exists(url):
        return
    import optuna

    try:
        with _quiet_optuna():
            summaries = optuna.get_all_study_summaries(storage=url, include_best_trial=False)
    except Exception as err:  # noqa: BLE001 - an incompatible schema, a locked or foreign database
        raise UsageError(f"--storage {_safe_url(url)}: cannot open it as an optuna storage ({err})") from None
    summary = next((s for s in summaries if s.study_name == name), None)
    if summary is None:
        return
    old = summary.user_attrs.get("vtprune")
    if old != signature:
        was = describe(old) if isinstance(old, dict) else "another program"
        raise UsageError(f"--study {name} in {_safe_url(url)} was created for {was}, not {describe(signature)}; "
                         "give another --study (or --out) for this search")


@contextlib.contextmanager
def _quiet_optuna():
    import optuna

    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(old)


# ------------------------------------------------------------------------------------------------------------
# the run
def run_search(settings: SearchSettings, *, model=None, processor=None, prog: str = "vtprune search") -> SearchResult:
    """Check, load the model (unless given), build the objective, run trials until the study has
    ``settings.trials`` finished ones (or the timeout, or Ctrl-C), write the outputs; see the module doc."""
    from ..adapters import get_adapter
    from ..benchmarks.runner import load_model
    from ..core.plan import model_info

    model_name = loaded_name(model) if model is not None else None
    checked = check_settings(settings, model_name)
    if model is None:
        model, processor, desc = load_model(settings.model, settings.dtype, settings.device)
        model_name = desc["name"]
    try:
        info = model_info(get_adapter(model))
    except TypeError as err:
        raise UsageError(f"--model {settings.model}: {err}") from None
    space = checked.plan.space(info)
    _check_on_model(model, checked.plan, info)
    objective = _build_objective(settings, checked, model, processor, model_name)
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


def _build_objective(settings, checked: Checked, model, processor, model_name: str):
    from . import objectives as obj

    tasks = obj.dev_tasks(checked.tasks, checked.data)
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
    """The first ``n`` questions of a task (MME: whole images, as the bench's --limit)."""
    from ..benchmarks import runner

    if task.name == "mme":
        return runner.TaskData(task.name, task.root, runner.limit_mme(task.questions, n))
    return runner.TaskData(task.name, task.root, task.questions[:n])


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


def open_study(checked: Checked, settings: SearchSettings):
    """(study, created): created here with the run's signature, or loaded to continue it."""
    import optuna
    from sqlalchemy.exc import IntegrityError

    checked.out.mkdir(parents=True, exist_ok=True)
    storage = make_storage(checked.storage)
    directions = ["maximize", "minimize"] if settings.pareto else ["maximize"]
    try:
        study = optuna.create_study(storage=storage, study_name=checked.study, directions=directions,
                                    pruner=make_pruner(settings), sampler=optuna.samplers.RandomSampler())
        study.set_user_attr("vtprune", checked.signature)
        created = True
    except (optuna.exceptions.DuplicatedStudyError, IntegrityError):  # another worker created it first
        study = optuna.load_study(study_name=checked.study, storage=storage, pruner=make_pruner(settings),
                                  sampler=optuna.samplers.RandomSampler())
        created = False
    # a resumed study or a joining worker gets its own seed: the first run's seed would redraw its random points
    seed = settings.seed if created else hash((settings.seed, len(study.trials), WORKER)) % 2**31
    study.sampler = make_sampler(settings.sampler, seed)
    return study, created


def make_storage(url: str, attempts: int = 5):
    """optuna's RDB storage with a heartbeat; workers creating a fresh database at once race on its tables,
    so a failed creation is retried."""
    import optuna
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DatabaseError

    sqlite = make_url(url).get_backend_name() == "sqlite"
    engine = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                              grace_period=GRACE_S)
        except DatabaseError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


def make_sampler(name: str, seed: int):
    """TPE (multivariate, grouped for conditional spaces, constant liar for parallel workers), GP or CMA-ES.
    TPE and GP read each trial's ``over_budget`` constraint (> 0: infeasible)."""
    import inspect

    import optuna

    cls, wanted = {
        "tpe": (optuna.samplers.TPESampler, {"multivariate": True, "group": True, "constant_liar": True}),
        "gp": (optuna.samplers.GPSampler, {"deterministic_objective": True, "warn_independent_sampling": False}),
        "cmaes": (optuna.samplers.CmaEsSampler, {"warn_independent_sampling": False}),
    }[name]
    wanted = {"seed": seed, **wanted}
    if legacy_constraints():  # optuna 4: constraints through a function of the finished trial
        wanted["constraints_func"] = lambda t: (float(t.user_attrs.get("over_budget", 0.0)),)
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in wanted.items() if k in accepted})


def legacy_constraints() -> bool:
    """optuna < 5 has no ``Trial.set_constraint``."""
    import optuna

    return not hasattr(optuna.trial.Trial, "set_constraint")


def make_pruner(settings: SearchSettings):
    """The median pruner for accuracy trials (answered in chunks); nothing to prune for flow or --pareto."""
    import optuna

    if settings.objective == "accuracy" and not settings.pareto:
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    return optuna.pruners.NopPruner()


# ------------------------------------------------------------------------------------------------------------
# trials
class _Skipped(Exception):
    """A trial dropped before it ran (the study is full, or a second copy of the defaults)."""


class _TrialError(Exception):
    """The configuration raised (a bad combination of values): the trial finished with an error."""


def counts(trial) -> bool:
    """A finished trial towards ``--trials``: completed, pruned, or failed with the configuration's error."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "error" in trial.user_attrs)


def finished(study) -> int:
    return sum(counts(t) for t in study.get_trials(deepcopy=False))


def _alive(worker: str) -> bool:
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another host: optuna's heartbeat decides
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead(study) -> int:
    """Fail the RUNNING trials of dead processes on this host (a killed run); returns how many."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        if worker and not _alive(worker):
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            n += 1
    return n


def ensure_defaults(study, params: dict) -> None:
    """Enqueue the defaults trial unless one is finished, running or waiting."""
    from optuna.trial import TrialState

    alive = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    if any(t.user_attrs.get("defaults") and (t.state in alive or counts(t)) for t in study.get_trials(deepcopy=False)):
        return
    study.enqueue_trial(params, user_attrs={"defaults": True})


def _claim(study, trial, total: int) -> None:
    """Raise _Skipped when ``trial`` would exceed ``total`` or repeat the defaults; else record its worker."""
    from optuna.trial import TrialState

    trial.set_user_attr("worker", WORKER)
    before = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number
              and (counts(t) or t.state == TrialState.RUNNING)]
    if len(before) >= total:
        trial.set_user_attr("skipped", "the study already has its trials")
        study.stop()
        raise _Skipped("full")
    if trial.user_attrs.get("defaults") and any(t.user_attrs.get("defaults") for t in before):
        trial.set_user_attr("skipped", "a second copy of the defaults trial")
        raise _Skipped("defaults twice")


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def make_objective(study, settings, checked: Checked, space, objective, model, model_name: str):
    """The optuna objective: claim, sample, build, evaluate, record."""
    import optuna

    from ..api import pruned
    from .space import trial_suggest

    plan = checked.plan

    def run(trial):
        _claim(study, trial, settings.trials)
        values = space.sample(trial_suggest(trial))
        is_defaults = bool(trial.user_attrs.get("defaults"))
        trial.set_user_attr("config", plan.config(None if is_defaults else values, model_name))
        same = _same_params(study, trial)
        if same is not None:  # a small discrete space repeats points: the objective is deterministic
            return _repeat(trial, same, settings.pareto)
        try:
            methods = plan.methods(None if is_defaults else values)
        except ConfigError as err:
            trial.set_user_attr("error", _one_line(err))
            raise _TrialError(_one_line(err)) from None

        def report(step, value):
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"step {step}: {value:.4f}")

        try:
            result = objective.evaluate(lambda: pruned(model, methods), None if settings.pareto else report)
        except (ConfigError, PruneError) as err:
            trial.set_user_attr("error", _one_line(err))
            raise _TrialError(_one_line(err)) from None
        trial.set_user_attr("over_budget", result.over_budget)
        if not legacy_constraints():
            trial.set_constraint("over_budget", result.over_budget)
        if result.warnings:
            trial.set_user_attr("warnings", result.warnings[:3])
        if settings.pareto:
            trial.set_user_attr("prefill_ms", result.prefill_ms)
            return result.value, result.prefill_ms
        return result.value

    return run


def _same_params(study, trial):
    """An earlier completed trial with exactly these parameters, or None."""
    from optuna.trial import TrialState

    return next((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.number < trial.number and t.params == trial.params), None)


def _repeat(trial, same, pareto: bool):
    """Record ``same``'s result for ``trial`` without evaluating it again."""
    trial.set_user_attr("repeat_of", same.number)
    for key in ("over_budget", "prefill_ms", "warnings"):
        if key in same.user_attrs:
            trial.set_user_attr(key, same.user_attrs[key])
    if not legacy_constraints():
        trial.set_constraint("over_budget", float(same.user_attrs.get("over_budget", 0.0)))
    return tuple(same.values) if pareto else same.values[0]


# ------------------------------------------------------------------------------------------------------------
# the loop
@contextlib.contextmanager
def stop_on_interrupt(flag: threading.Event, prog: str):
    """First Ctrl-C: finish the current trial, then stop; a second one aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()
        print(f"\n{prog}: stopping after the current trial (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


class Progress:
    """A progress bar over the study's finished trials (all workers), with the best value so far; a line per
    trial instead with --no-progress or where no one watches (a CI log)."""

    def __init__(self, study, total: int, enabled: bool, label: str):
        from ..progress import progress_bar

        self.label = label
        self.bar = progress_bar(total, label, "trial", enabled, initial=min(total, finished(study)))

    def update(self, study, frozen) -> None:
        from . import outputs

        n = finished(study)
        best = outputs.best_trial(study.get_trials(deepcopy=False), len(study.directions) > 1)
        text = f"best {best.values[0]:.5f} (trial {best.number})" if best is not None else "no feasible trial yet"
        if self.bar is not None:
            self.bar.n = min(self.bar.total, n)
            self.bar.set_postfix_str(text)
        else:
            print(f"{self.label}: trial {frozen.number} {frozen.state.name.lower()}, {n} finished; {text}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _optimize(study, settings, checked: Checked, space, objective, model, model_name, prog) -> SearchResult:
    import optuna

    from . import outputs

    reap_dead(study)
    ensure_defaults(study, space.defaults())
    stop = threading.Event()
    progress = Progress(study, settings.trials, settings.progress, checked.study)
    errors_in_a_row = [0]

    def after(study_, frozen) -> None:
        if "skipped" in frozen.user_attrs:
            return
        progress.update(study_, frozen)
        errors_in_a_row[0] = errors_in_a_row[0] + 1 if "error" in frozen.user_attrs else 0
        if finished(study_) >= settings.trials or stop.is_set() or errors_in_a_row[0] >= MAX_ERRORS_IN_A_ROW:
            study_.stop()

    run = make_objective(study, settings, checked, space, objective, model, model_name)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # skipped / failed trials are in trials.csv
    try:
        if finished(study) < settings.trials:
            with stop_on_interrupt(stop, prog):
                study.optimize(run, n_trials=None, timeout=settings.timeout, callbacks=[after],
                               catch=(_Skipped, _TrialError), gc_after_trial=False)
    finally:
        progress.close()
    if errors_in_a_row[0] >= MAX_ERRORS_IN_A_ROW:
        print(f"{prog}: stopped after {MAX_ERRORS_IN_A_ROW} failing trials in a row; see the error column of "
              f"{checked.out / 'trials.csv'}", file=sys.stderr)
    result = outputs.write_outputs(study, checked, space, settings, model_name)
    result.interrupted = stop.is_set()
    return result


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
