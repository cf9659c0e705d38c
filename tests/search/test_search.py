"""``vtprune search`` on the embedded tiny LLaVA: the flow objective against a hand-computed reference, best.yaml
reproducing its trial, resuming a killed study, two worker processes on one SQLite file, Ctrl-C, --pareto,
accuracy chunks, the dev split, and bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vtprune
from vtprune.search import objectives
from vtprune.search import study as study_mod

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """The synthetic dev sets go into a test-owned cache folder (also for the worker processes)."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VTPRUNE_CACHE_DIR", str(path))
        for task in ("mme", "gqa"):
            objectives.dev_data_dir(task)
        yield path


@pytest.fixture(scope="module")
def embedded():
    from vtprune.benchmarks.runner import load_model

    model, processor, _ = load_model(None, "float32", "cpu")
    return model, processor


def _search(embedded, out, **kwargs):
    model, processor = embedded
    settings = dict(calib=4, batch_size=4, progress=False, out=out)
    return vtprune.search(model=model, processor=processor, **{**settings, **kwargs})


def _trials(result):
    return optuna.load_study(study_name=result.study, storage=result.storage).get_trials()


def _last_token_states(model, batches) -> torch.Tensor:
    """Independent of the objective code: the final hidden state (after the model's final norm) of the last
    prompt position, from a plain forward."""
    lm = model.model.language_model
    rows = []
    with torch.no_grad():
        for batch in batches:
            seen: dict = {}
            handle = lm.layers[-1].register_forward_hook(
                lambda m, a, o, seen=seen: seen.setdefault("x", o[0] if isinstance(o, tuple) else o))
            model(**batch)
            handle.remove()
            rows.append(lm.norm(seen["x"])[:, -1].float())
    return torch.cat(rows)


def _flow_by_hand(model, batches, **prune) -> float:
    reference = _last_token_states(model, batches)
    with vtprune.pruned(model, **prune):
        pruned = _last_token_states(model, batches)
    return float(torch.nn.functional.cosine_similarity(reference, pruned, dim=-1).mean())


@pytest.mark.filterwarnings("ignore:vtprune. vflowopt cannot average")  # best.yaml may be a schedule under budget
def test_ten_trial_flow_search_beats_or_keeps_the_defaults_and_best_yaml_reproduces(embedded, tmp_path):
    model, processor = embedded
    result = _search(embedded, tmp_path / "out", method="vflowopt", keep=16, trials=10)
    trials = _trials(result)
    assert result.finished == 10 and len(trials) == 10
    assert trials[0].user_attrs["defaults"] and trials[0].user_attrs["config"] == {"method": "vflowopt",
                                                                                   "model": "tiny-llava", "keep": 16}
    assert result.best_value >= result.defaults_value
    tasks = objectives.dev_tasks(["mme", "gqa"], {})
    batches, _ = objectives.calibration_inputs(model, processor, tasks, 4, 4, "llava_v1")
    assert result.defaults_value == pytest.approx(_flow_by_hand(model, batches, method="vflowopt", keep=16), abs=1e-5)
    best = tmp_path / "out" / "best.yaml"
    assert result.files["best"] == best
    assert _flow_by_hand(model, batches, config=best) == pytest.approx(result.best_value, abs=1e-5)
    from vtprune.benchmarks.runner import load_method_config

    assert load_method_config(str(best))[:2] == ("best", "vflowopt")  # vtprune bench --config takes it
    rows = list(csv.DictReader((tmp_path / "out" / "trials.csv").open()))
    assert [int(r["number"]) for r in rows] == list(range(10)) and rows[0]["defaults"] == "True"
    assert (tmp_path / "out" / "history.png").stat().st_size > 0
    assert len(list((tmp_path / "out").glob("flow-reference-*.pt"))) == 1


class _Crash(Exception):
    pass


def test_a_killed_search_resumes_without_repeating_finished_trials(embedded, tmp_path, monkeypatch):
    out = tmp_path / "out"
    update = study_mod.Progress.update

    def crash_after_three(self, study, frozen):
        update(self, study, frozen)
        if study_mod.finished(study) >= 3:
            raise _Crash  # the process dies here: no outputs written

    monkeypatch.setattr(study_mod.Progress, "update", crash_after_three)
    with pytest.raises(_Crash):
        _search(embedded, out, method="flowcut", keep=16, trials=6, calib=2, batch_size=2)
    monkeypatch.setattr(study_mod.Progress, "update", update)
    assert not (out / "best.yaml").exists()
    url = f"sqlite:///{(out / 'study.db').resolve()}"
    study = optuna.load_study(study_name="flowcut-keep16-flow", storage=url)
    before = {t.number: (t.params, t.values, t.datetime_complete) for t in study.get_trials()}
    assert len(before) == 3
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    zombie = study.ask()  # a trial whose process was killed mid-way: RUNNING forever in the storage
    zombie.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")

    result = _search(embedded, out, method="flowcut", keep=16, trials=6, calib=2, batch_size=2)
    trials = _trials(result)
    assert result.finished == 6
    for t in trials:
        if t.number in before:
            assert (t.params, t.values, t.datetime_complete) == before[t.number]
    assert trials[zombie.number].state.name == "FAIL" and trials[zombie.number].user_attrs["interrupted"]
    new = [t for t in trials if t.number not in before and t.number != zombie.number]
    assert len(new) == 3 and all(study_mod.counts(t) for t in new)
    assert sum(bool(t.user_attrs.get("defaults")) for t in trials) == 1
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert sum(r["counted"] == "True" for r in rows) == 6


def test_two_worker_processes_share_one_sqlite_study(embedded, tmp_path, cache):
    db = tmp_path / "shared.db"
    env = {**os.environ, "VTPRUNE_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "vtprune.cli", "search", "--method", "flowcut", "--keep", "16", "--trials", "8",
           "--calib", "4", "--batch-size", "4", "--storage", f"sqlite:///{db}", "--study", "shared", "--no-progress"]
    workers = [subprocess.Popen(cmd + ["--out", str(tmp_path / f"w{i}")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
    logs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    trials = optuna.load_study(study_name="shared", storage=f"sqlite:///{db}").get_trials()
    counted = [t for t in trials if study_mod.counts(t)]
    assert len(counted) == 8
    assert len({t.number for t in trials}) == len(trials)
    assert sum(bool(t.user_attrs.get("defaults")) for t in counted) == 1
    points = [tuple(sorted(t.params.items())) for t in counted if "repeat_of" not in t.user_attrs]
    assert len(points) == len(set(points))
    reported = [{int(r["number"]) for r in csv.DictReader((tmp_path / f"w{i}" / "trials.csv").open())
                 if r["counted"] == "True"} for i in range(2)]
    assert all(r <= {t.number for t in counted} for r in reported)  # the study as each worker left it
    assert {t.number for t in counted} in reported  # the last one to finish saw all of it


def test_ctrl_c_stops_after_the_current_trial_and_the_rerun_continues(embedded, tmp_path, monkeypatch):
    update = study_mod.Progress.update

    def interrupt(self, study, frozen):
        update(self, study, frozen)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(study_mod.Progress, "update", interrupt)
    first = _search(embedded, tmp_path / "out", method="fastv", keep=16, trials=3, calib=2, batch_size=2)
    assert first.interrupted and first.finished == 1 and (tmp_path / "out" / "best.yaml").exists()
    monkeypatch.setattr(study_mod.Progress, "update", update)
    second = _search(embedded, tmp_path / "out", method="fastv", keep=16, trials=3, calib=2, batch_size=2)
    assert not second.interrupted and second.finished == 3


def test_pareto_front_of_flow_and_prefill_time(embedded, tmp_path):
    result = _search(embedded, tmp_path / "out", method="vflowopt", keep=16, trials=4, calib=2, batch_size=2,
                     pareto=True)
    rows = [r for r in csv.DictReader((tmp_path / "out" / "trials.csv").open()) if r["feasible"] == "True"]
    pts = {int(r["number"]): (float(r["flow"]), float(r["prefill_ms"])) for r in rows}
    front = {n for n, (v, ms) in pts.items()
             if not any(v2 >= v and ms2 <= ms and (v2, ms2) != (v, ms) for v2, ms2 in pts.values())}
    assert {p["trial"] for p in result.front} == front
    assert {r["number"] for r in rows if r["pareto"] == "True"} == {str(n) for n in front}
    assert all((tmp_path / "out" / "front" / f"trial-{n}.yaml").is_file() for n in front)
    assert (tmp_path / "out" / "pareto.png").is_file()
    assert result.best_value == max(pts[n][0] for n in front)


def test_accuracy_trials_report_each_chunk(embedded, tmp_path):
    result = _search(embedded, tmp_path / "out", method="fastv", keep=16, trials=2, calib=4, objective="accuracy")
    trials = _trials(result)
    assert result.finished == 2
    complete = [t for t in trials if t.state.name == "COMPLETE" and "repeat_of" not in t.user_attrs]
    # 4 questions per task: MME 2 images (2 units), GQA 4 -> 6 units in chunks of ceil(6 / 4) = 2: 3 chunks,
    # the pruner sees the first two (the last one is the trial's value)
    assert complete and all(sorted(t.intermediate_values) == [0, 1] for t in complete)
    assert all(0.0 <= t.values[0] <= 100.0 for t in complete)


def test_task_percent_and_mme_units_follow_the_official_scores():
    from vtprune.benchmarks.mme import MMEQuestion
    from vtprune.benchmarks.runner import TaskData

    q = [MMEQuestion("color", f"{i}.png", Path(f"{i}.png"), "Is it red? Please answer yes or no.", a, k)
         for i in range(2) for k, a in enumerate(("Yes", "No"))]
    # image 0: both right (acc+ 1), image 1: one right -> acc 3/4 = 75, acc+ 1/2 = 50 -> 125 of 200
    assert objectives.task_percent("mme", q, ["yes", "no", "yes", "yes"]) == pytest.approx(62.5)
    units = objectives.interleaved_units([TaskData("mme", Path("."), q)])
    assert [u.indices for u in units] == [[0, 1], [2, 3]]


def test_the_synthetic_dev_split_shares_no_image_with_the_bench_test_split():
    from PIL import Image

    from vtprune.benchmarks.runner import default_data_dir, load_task

    def digests(tasks):
        return {hashlib.sha1(Image.open(q.image_path).convert("RGB").tobytes()).hexdigest()
                for t in tasks for q in t.questions}

    test = digests([load_task(t, default_data_dir(t)) for t in ("mme", "gqa")])
    dev = digests(objectives.dev_tasks(["mme", "gqa"], {}))
    assert dev and not dev & test
    assert objectives.bench_test_dirs() >= {default_data_dir("mme").resolve(), default_data_dir("gqa").resolve()}


def _cli(argv, capsys) -> tuple[int, str]:
    from vtprune.cli import main

    try:
        code = main(["search", *argv])
    except SystemExit as exit:  # argparse's errors
        code = exit.code
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("argv, message", [
    (["--method", "nosuch", "--keep", "16"], "--method nosuch: vtprune: unknown method 'nosuch'"),
    (["--method", "fastv", "--keep", "16", "--set", "layr=3"], "--set layr: unknown parameter"),
    (["--method", "fastv", "--keep", "16", "--params", "nope"], "--params nope: unknown parameter"),
    (["--method", "random", "--keep", "16"], "empty search space: random declares no searchable field"),
    (["--method", "fastv", "--keep", "16", "--storage", "sqlite:////no/such/dir/s.db"],
     "folder /no/such/dir does not exist"),
    (["--method", "fastv", "--keep", "16", "--storage", "nosuchdb://host/db"], "no database driver for 'nosuchdb'"),
    (["--method", "fastv", "--keep", "16", "--storage", "not a url"], "not a database URL"),
    (["--method", "fastv", "--keep", "16", "--storage", "postgresql://u:secret@127.0.0.1:1/db"], "postgresql"),
    (["--method", "fastv", "--keep", "16", "--data", "gqa=" + str(ROOT / "vtprune/assets/synthetic_gqa")],
     "that is the bench's test split"),
    (["--method", "fastv", "--keep", "999"], "--keep 999: more than the 144 visual tokens"),
    (["--method", "fastv", "--keep", "16", "--trials", "0"], "argument --trials: must be >= 1"),
    (["--method", "fastv", "--keep", "16", "--timeout", "0"], "argument --timeout: must be a finite number > 0"),
    (["--method", "fastv", "--keep", "16", "--timeout", "nan"], "argument --timeout: must be a finite number > 0"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _cli([*argv, "--out", str(out)], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("vtprune search: error: ") and message in err, err
    assert "secret" not in err
    assert not out.exists()


def test_a_storage_file_that_is_not_a_database_is_refused_untouched(tmp_path, capsys):
    bad = tmp_path / "notes.db"
    bad.write_text("not a database\n")
    code, err = _cli(["--method", "fastv", "--keep", "16", "--storage", f"sqlite:///{bad}",
                      "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "cannot be opened as an SQLite database" in err and len(err.splitlines()) == 1
    assert bad.read_text() == "not a database\n" and not (tmp_path / "out").exists()


@pytest.mark.skipif(__import__("importlib").util.find_spec("scipy") is not None, reason="scipy is installed")
def test_gp_without_scipy_says_what_to_install(tmp_path, capsys):
    code, err = _cli(["--method", "fastv", "--keep", "16", "--sampler", "gp", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "pip install scipy" in err


def test_rerunning_with_another_search_under_the_same_study_name_is_refused(embedded, tmp_path, capsys):
    _search(embedded, tmp_path / "out", method="fastv", keep=16, trials=1, calib=2, batch_size=2, study="mine")
    code, err = _cli(["--method", "fastv", "--keep", "32", "--study", "mine", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "was created for fastv keep 16" in err and "give another --study" in err


def test_no_progress_bar_in_a_log_but_a_line_per_trial(capsys):
    """Output captured (not a terminal, as in CI): no bar even with progress on, one plain line per trial."""
    study = optuna.create_study()
    study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=1)
    progress = study_mod.Progress(study, 3, True, "demo")
    progress.update(study, study.trials[0])
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert progress.bar is None and len(lines) == 1 and lines[0].startswith("demo: trial 0 complete, 1 finished")
