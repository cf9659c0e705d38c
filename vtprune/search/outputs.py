"""A search's outputs in ``--out``: ``best.yaml`` (a ``configs/``-format config), ``trials.csv`` and a plot
(the optimisation history, or with ``--pareto`` the front, whose members are also ``front/trial-N.yaml``).

Best = the feasible completed trial (within an average budget) with the highest objective, the lower trial
number on a tie, so the defaults (trial 0) stay best unless a trial beats them. Pareto front = the feasible
completed trials no other one beats on both the objective (higher) and the prefill time (lower).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

OBJECTIVE_TEXT = {"flow": "flow (mean cosine of the final-norm last-token state, pruned vs unpruned)",
                  "accuracy": "accuracy (mean task percentage on the dev split)"}


def _shown(trials) -> list:
    """Trials worth reporting: every one but those dropped before running."""
    return [t for t in trials if "skipped" not in t.user_attrs]


def feasible(trial) -> bool:
    from optuna.trial import TrialState

    return (trial.state == TrialState.COMPLETE and trial.values is not None
            and float(trial.user_attrs.get("over_budget", 0.0)) <= 0.0)


def pareto_front(trials) -> list:
    """Feasible trials not dominated on (objective up, prefill ms down), by trial number."""
    pts = [t for t in trials if feasible(t) and len(t.values) > 1 and t.values[1] is not None]

    def beats(a, b):
        return (a.values[0] >= b.values[0] and a.values[1] <= b.values[1]
                and (a.values[0] > b.values[0] or a.values[1] < b.values[1]))

    return sorted((t for t in pts if not any(beats(o, t) for o in pts)), key=lambda t: t.number)


def best_trial(trials, pareto: bool = False):
    """The best feasible trial (on the front for --pareto): highest objective, then lowest number."""
    pool = pareto_front(trials) if pareto else [t for t in trials if feasible(t)]
    return max(pool, key=lambda t: (t.values[0], -t.number), default=None)


def defaults_trial(trials):
    from optuna.trial import TrialState

    return next((t for t in trials if t.user_attrs.get("defaults") and t.state == TrialState.COMPLETE), None)


def write_outputs(study, checked, space, settings, model_name: str):
    """Write best.yaml, trials.csv and the plot; returns the :class:`~.settings.SearchResult`."""
    from .settings import SearchResult
    from .trials import counts

    trials = _shown(study.get_trials(deepcopy=False))
    out = Path(checked.out)
    out.mkdir(parents=True, exist_ok=True)
    best = best_trial(trials, settings.pareto)
    front = pareto_front(trials) if settings.pareto else []
    default = defaults_trial(trials)
    files = {"trials": write_csv(trials, out / "trials.csv", settings.objective, {t.number for t in front})}
    files["plot"] = plot(trials, out / ("pareto.png" if settings.pareto else "history.png"), settings, front,
                         checked.study)
    if best is not None:
        files["best"] = write_config(best, out / "best.yaml", checked, settings, sum(map(counts, trials)), default)
    for t in front:
        files.setdefault("front", []).append(write_config(t, out / "front" / f"trial-{t.number}.yaml", checked,
                                                          settings, None, default))
    running = sum(t.state.name == "RUNNING" for t in trials)
    return SearchResult(
        study=checked.study, storage=checked.storage, out=out, finished=sum(map(counts, trials)), running=running,
        best=best.user_attrs.get("config") if best else None, best_value=best.values[0] if best else None,
        best_trial=best.number if best else None, defaults_value=default.values[0] if default else None,
        front=[{"trial": t.number, "value": t.values[0], "prefill_ms": t.values[1],
                "config": t.user_attrs.get("config")} for t in front],
        files=files)


def write_config(trial, path: Path, checked, settings, n_finished: int | None, default) -> Path:
    """One trial's configuration as a commented config file."""
    import yaml

    value = f"{settings.objective} {trial.values[0]:.6f}"
    if settings.pareto:
        value += f", prefill {trial.values[1]:.2f} ms"
    lines = [f"# vtprune search, study {checked.study}: trial {trial.number}"
             + (" (the defaults)" if trial.user_attrs.get("defaults") else "")
             + (f", best of {n_finished} finished" if n_finished is not None else ", on the Pareto front"),
             f"# {value}; objective: {OBJECTIVE_TEXT[settings.objective]}",
             f"# on {_data_text(checked)}"]
    if default is not None and default.number != trial.number:
        lines.append(f"# the defaults (trial {default.number}): {settings.objective} {default.values[0]:.6f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.dump(trial.user_attrs["config"], Dumper=_flow_lists(), sort_keys=False)
    path.write_text("\n".join(lines) + "\n" + body)
    return path


def _flow_lists():
    """A safe YAML dumper writing lists inline (``llm_ratios: [0.5]``), as the shipped configs do."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    return Dumper


def _data_text(checked) -> str:
    where = ", ".join(f"{t} {checked.data[t]}" if t in checked.data else f"synthetic {t} dev set"
                      for t in checked.tasks)
    samples = (f"the first {checked.calib} samples" if checked.signature["objective"] == "flow"
               else f"{checked.calib} questions per task" if checked.calib else "every question")
    return f"{samples} of: {where}"


def write_csv(trials: Sequence, path: Path, objective: str, front: set) -> Path:
    """One row per trial: number, state, whether it counts, values, feasibility, parameters, error."""
    from .trials import counts

    params = sorted({p for t in trials for p in t.params})
    multi = any(t.values is not None and len(t.values) > 1 for t in trials)
    head = ["number", "state", "counted", "defaults", "repeat_of", objective]
    head += ["prefill_ms", "pareto"] if multi else []
    head += ["feasible", "over_budget", "duration_s", "worker"] + params + ["error", "warnings"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(head)
        for t in trials:
            values = list(t.values) if t.values is not None else [None, None]
            row = [t.number, t.state.name, counts(t), bool(t.user_attrs.get("defaults")), t.user_attrs.get("repeat_of"),
                   values[0]]
            if multi:
                row += [values[1] if len(values) > 1 else None, t.number in front]
            duration = t.duration.total_seconds() if t.duration is not None else None
            row += [feasible(t), t.user_attrs.get("over_budget"), duration, t.user_attrs.get("worker")]
            row += [t.params.get(p) for p in params]
            row += [t.user_attrs.get("error") or ("interrupted" if t.user_attrs.get("interrupted") else None),
                    " | ".join(t.user_attrs.get("warnings", [])) or None]
            writer.writerow(["" if v is None else v for v in row])
    return path


def plot(trials: Sequence, path: Path, settings, front: Sequence, title: str) -> Path:
    """The optimisation history (objective per trial, running best), or the Pareto front."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ok = [t for t in trials if feasible(t)]
    over = [t for t in trials if t.values is not None and not feasible(t)]
    default = [t for t in ok if t.user_attrs.get("defaults")]
    if settings.pareto:
        _pareto_axes(ax, ok, over, default, front, settings.objective)
    else:
        _history_axes(ax, ok, over, default, settings.objective)
    ax.set_title(f"{title}: {len([t for t in trials if t.values is not None])} completed trials", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _history_axes(ax, ok, over, default, objective) -> None:
    ax.scatter([t.number for t in ok], [t.values[0] for t in ok], s=14, label="trial")
    if over:
        ax.scatter([t.number for t in over], [t.values[0] for t in over], marker="x", color="grey", s=14,
                   label="over budget (infeasible)")
    best, xs, ys = None, [], []
    for t in sorted(ok, key=lambda t: t.number):
        best = t.values[0] if best is None else max(best, t.values[0])
        xs.append(t.number)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="C1", label="best so far")
    if default:
        ax.scatter([default[0].number], [default[0].values[0]], marker="*", s=120, color="C3", label="defaults")
    ax.set_xlabel("trial")
    ax.set_ylabel(objective)


def _pareto_axes(ax, ok, over, default, front, objective) -> None:
    ax.scatter([t.values[1] for t in ok], [t.values[0] for t in ok], s=14, label="trial")
    if over:
        ax.scatter([t.values[1] for t in over], [t.values[0] for t in over], marker="x", color="grey", s=14,
                   label="over budget (infeasible)")
    pts = sorted(front, key=lambda t: t.values[1])
    ax.plot([t.values[1] for t in pts], [t.values[0] for t in pts], marker="o", color="C1", label="Pareto front")
    if default:
        ax.scatter([default[0].values[1]], [default[0].values[0]], marker="*", s=120, color="C3", label="defaults")
    ax.set_xlabel("prefill ms per sample (measured)")
    ax.set_ylabel(objective)
