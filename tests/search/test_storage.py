"""SQLite ignores SELECT ... FOR UPDATE, so two workers could both move the one enqueued (defaults) trial from
WAITING to RUNNING and run it twice (the second tell then failed: "Cannot tell a COMPLETE trial"). vtprune's SQLite
storage makes that move under a lock file and re-reads the state there."""

from __future__ import annotations

import contextlib
import warnings

import optuna
from optuna.trial import TrialState

from vtprune.search import storage as storage_mod


def test_a_waiting_trial_is_taken_under_the_lock_and_only_once(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    taken = []

    @contextlib.contextmanager
    def recording_lock(u):
        taken.append(u)
        yield

    monkeypatch.setattr(storage_mod, "_file_lock", recording_lock)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, second = storage_mod.make_storage(url), storage_mod.make_storage(url)
        study = optuna.create_study(storage=first, study_name="s")
        study.enqueue_trial({"x": 1.0})
    waiting = first.get_all_trials(study._study_id, states=(TrialState.WAITING,))[0]._trial_id
    assert first.set_trial_state_values(waiting, TrialState.RUNNING) is True
    assert second.set_trial_state_values(waiting, TrialState.RUNNING) is False  # the other worker's view
    assert taken == [url, url]


def test_the_lock_file_sits_beside_the_database(tmp_path):
    with storage_mod._file_lock(f"sqlite:///{tmp_path / 'study.db'}"):
        assert (tmp_path / "study.db.lock").exists()
