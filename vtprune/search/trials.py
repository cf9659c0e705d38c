"""Trials: which ones count towards ``--trials``, claiming a trial (so racing workers stop at N), failing the
trials of dead processes, the defaults trial, and the optuna objective (claim, sample, build, evaluate, record)."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from ..errors import ConfigError, PruneError
from .storage import WORKER, legacy_constraints

if TYPE_CHECKING:
    from .settings import Checked


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
