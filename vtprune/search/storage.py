"""A study's storage: checking a ``--storage`` URL and an existing study without creating anything, then
opening the study (optuna's RDB storage with a heartbeat) with its sampler and pruner."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..cliargs import UsageError
from .plan import describe

if TYPE_CHECKING:
    from .settings import Checked, SearchSettings

HEARTBEAT_S, GRACE_S = 10, 60  # optuna heartbeat: a trial silent for GRACE_S is failed (a dead remote worker)
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # recorded on each trial this process runs


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

    parsed = make_url(url)
    sqlite = parsed.get_backend_name() == "sqlite"
    engine = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    on_disk = sqlite and parsed.database not in (None, "", ":memory:")
    cls = _sqlite_storage_class() if on_disk else optuna.storages.RDBStorage
    for attempt in range(attempts):
        try:
            return cls(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
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


def _sqlite_storage_class():
    """optuna's RDB storage whose WAITING -> RUNNING move of a trial holds a lock file beside the database: SQLite
    ignores ``SELECT ... FOR UPDATE``, so two workers could both take the one enqueued (defaults) trial, run it twice,
    and the second ``tell`` failed ("Cannot tell a COMPLETE trial")."""
    import optuna
    from optuna.trial import TrialState

    class LockedSQLiteStorage(optuna.storages.RDBStorage):
        def set_trial_state_values(self, trial_id, state, values=None) -> bool:
            if state != TrialState.RUNNING:
                return super().set_trial_state_values(trial_id, state, values)
            with _file_lock(self.url):
                if self.get_trial(trial_id).state != TrialState.WAITING:
                    return False
                return super().set_trial_state_values(trial_id, state, values)

    return LockedSQLiteStorage


@contextlib.contextmanager
def _file_lock(url: str):
    """An exclusive lock on ``<database>.lock`` (no-op where ``fcntl`` is missing: Windows)."""
    from sqlalchemy.engine import make_url

    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(f"{make_url(url).database}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
