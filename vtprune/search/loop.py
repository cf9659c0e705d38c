"""The study loop: run trials until the study has ``--trials`` finished ones (or the timeout, or Ctrl-C; a second
Ctrl-C aborts), with a progress bar over every worker's trials, then write the outputs."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import TYPE_CHECKING

from .trials import _Skipped, _TrialError, ensure_defaults, finished, make_objective, reap_dead

if TYPE_CHECKING:
    from .settings import Checked, SearchResult

MAX_ERRORS_IN_A_ROW = 10


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
