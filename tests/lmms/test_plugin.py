"""``lmms-eval --model vtprune`` end to end on the embedded tiny LLaVA, offline, with the shipped task pack: runs
unpruned and pruned, stats per task in the results, a generation that raises fails the run, bad --model_args
load nothing, and the unpruned scores equal ``vtprune bench``'s vanilla scores on the same questions.

These need lmms-eval (the ``lmms`` extra, ``make lmms-env``); in the main environment they skip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

pytest.importorskip("lmms_eval")
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")

from lmms_eval import evaluator  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from vtprune.lmms import TASKS_DIR  # noqa: E402
from vtprune.lmms.args import PluginExit  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "vtprune" / "assets" / "tiny-llava"
TASKS = ["vtprune_mme", "vtprune_gqa", "vtprune_pope"]
LIMIT = 8  # MME: 4 whole images
STAT_NAMES = ("visual_tokens", "kept_tokens", "equivalent_tokens", "prefill_flops", "kv_bytes")


def evaluate(model_args: str, tasks=TASKS, limit=LIMIT) -> dict:
    return evaluator.simple_evaluate(model="vtprune", model_args=f"pretrained={TINY},{model_args}".rstrip(","),
                                     tasks=list(tasks), limit=limit, log_samples=True,
                                     task_manager=TaskManager(include_path=str(TASKS_DIR)))


@pytest.fixture(scope="module")
def unpruned():
    return evaluate("")


def metric(results: dict, task: str, name: str):
    return results["results"][task][f"{name},none"]


def test_entry_point_resolves_to_the_plugin():
    from lmms_eval.models import get_model

    from vtprune.lmms.model import Vtprune

    assert get_model("vtprune") is Vtprune


@pytest.mark.parametrize("bad, words", [
    ("method=nope,ratio=0.5", "unknown method"),
    ("method=fastv,ratio=0.5,nope=1", "unknown keyword"),
    ("method=fastv,ratio=1.5", "ratio must be a number in [0, 1)"),
    ("method=fastv,ratio=0.5,keep=32", "exactly one budget"),
])
def test_bad_model_args_load_nothing(bad, words, tmp_path, capsys):
    """The checkpoint folder holds only config.json: loading weights would fail differently."""
    from vtprune.lmms.model import Vtprune

    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    with pytest.raises(PluginExit) as info:
        Vtprune.create_from_arg_string(f"pretrained={tmp_path},{bad}")
    assert info.value.code == 2 and words in str(info.value)
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_cli_bad_model_args_exit_2_with_one_line():
    """lmms-eval exits 0 when a model constructor raises an Exception; the plugin's error ends the run."""
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "vtprune", "--model_args",
           f"pretrained={TINY},method=fastv,ratio=1.5", "--include_path", str(TASKS_DIR), "--tasks", "vtprune_pope"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [ln for ln in done.stderr.splitlines() if "lmms-eval --model vtprune: error:" in ln]
    assert len(lines) == 1 and "ratio must be a number in [0, 1)" in lines[0]
    assert "Loading weights" not in done.stderr


def _config_numbers():
    cfg = json.loads((TINY / "config.json").read_text())
    text = cfg["text_config"]
    return cfg["image_seq_length"], text["num_hidden_layers"]


def test_unpruned_runs_with_stats(unpruned):
    n_visual, _ = _config_numbers()
    for task in TASKS:
        assert metric(unpruned, task, "vtprune_visual_tokens") == n_visual
        assert metric(unpruned, task, "vtprune_kept_tokens") == n_visual
        assert metric(unpruned, task, "vtprune_equivalent_tokens") == n_visual
        assert metric(unpruned, task, "vtprune_prefill_flops") > 0 and metric(unpruned, task, "vtprune_kv_bytes") > 0
    sample = unpruned["samples"]["vtprune_gqa"][0]["token_counts"][0]
    assert {f"vtprune_{k}" for k in STAT_NAMES} <= set(sample)


@pytest.mark.parametrize("method, fields", [("fastv", {"ratio": 0.75}), ("visionzip", {"keep": 36}),
                                            ("transprune", {"ratio": 0.75})])
def test_pruned_runs_with_stats(method, fields, unpruned):
    import vtprune

    results = evaluate(",".join([f"method={method}"] + [f"{k}={v}" for k, v in fields.items()]))
    n_visual, layers = _config_numbers()
    m = vtprune.method(method, **fields)
    for task in TASKS:
        kept = metric(results, task, "vtprune_kept_tokens")
        assert kept < n_visual
        assert metric(results, task, "vtprune_equivalent_tokens") < n_visual
        assert metric(results, task, "vtprune_prefill_flops") < metric(unpruned, task, "vtprune_prefill_flops")
        assert metric(results, task, "vtprune_kv_bytes") <= metric(unpruned, task, "vtprune_kv_bytes")
    if method == "fastv":  # kept = 144 / 4 from layer K on: equivalent = (K * 144 + (L - K) * 36) / L
        k = m.layer
        assert metric(results, "vtprune_mme", "vtprune_kept_tokens") == n_visual // 4
        expected = (k * n_visual + (layers - k) * (n_visual // 4)) / layers
        assert metric(results, "vtprune_mme", "vtprune_equivalent_tokens") == pytest.approx(expected)


def test_raising_method_fails_the_run():
    """The chat llava_hf class catches generation errors and scores an empty answer; the plugin stops instead."""
    from vtprune.methods.base import Cut, Method
    from vtprune.registry import register

    @register
    @dataclass
    class _Raises(Method):
        name: ClassVar[str] = "_test_lmms_raises"
        description: ClassVar[str] = "test: raises inside generation"
        has_budget: ClassVar[bool] = False

        def cuts(self, model):
            return (Cut("pre_llm"),)

        def select(self, image, n_keep):
            raise RuntimeError("raised on purpose inside generation")

    with pytest.raises(PluginExit) as info:
        evaluate("method=_test_lmms_raises", tasks=["vtprune_pope"], limit=4)
    assert info.value.code == 1
    message = str(info.value)
    # stops at the next request: vtprune unprunes a model whose method raised
    assert "1 failure(s) after 1 of 4 request(s)" in message and "raised on purpose inside generation" in message
    assert "Traceback" in message


def _lmms_predictions(results: dict, task: str) -> dict:
    """(image path, question) -> the answer lmms-eval scored."""
    out = {}
    for s in results["samples"][f"vtprune_{task}"]:
        resp = s["resps"][0]
        out[(s["doc"]["image_path"], s["doc"]["question"])] = (resp[0] if isinstance(resp, list) else resp).strip()
    return out


@pytest.fixture(scope="module")
def bench_vanilla(tmp_path_factory):
    """``vtprune bench`` unpruned on the same questions, with lmms-eval's prompt (the chat template), one prompt
    per batch (no padding) and lmms-eval's answer length."""
    from vtprune.eval.run import run_bench
    from vtprune.eval.sweep import BenchSettings

    settings = BenchSettings(model=str(TINY), tasks=("mme", "gqa", "pope"), methods=[], limit=LIMIT, batch_size=1,
                             max_new_tokens=16, prompt_style="chat_template", timing_samples=0, decode_tokens=0,
                             out=tmp_path_factory.mktemp("bench"), progress=False, device="cpu")
    return run_bench(settings, write=False)["runs"][0]


@pytest.mark.parametrize("task", ["mme", "gqa", "pope"])
def test_unpruned_answers_and_scores_equal_bench_vanilla(task, unpruned, bench_vanilla):
    from vtprune.eval.data import load_task

    questions = load_task(task, limit=LIMIT).questions
    bench = {(str(q.image_path), q.question): p["prediction"]
             for q, p in zip(questions, bench_vanilla["predictions"][task])}
    assert _lmms_predictions(unpruned, task) == bench  # the same questions, answered alike
    score = bench_vanilla["scores"][task]
    if task == "mme":
        assert metric(unpruned, "vtprune_mme", "mme_perception_score") == pytest.approx(score["perception"])
    elif task == "gqa":
        assert 100 * metric(unpruned, "vtprune_gqa", "exact_match") == pytest.approx(score["accuracy"])
    else:  # bench reports both POPE conventions; lmms-eval's is exact yes/no over the pooled questions
        pooled = score["lmms_eval"]["all"]
        for name in ("accuracy", "precision", "recall", "f1"):
            assert 100 * metric(unpruned, "vtprune_pope", f"pope_{'f1_score' if name == 'f1' else name}") == \
                pytest.approx(pooled[name])


def test_scorers_agree_on_other_predictions():
    """vtprune's scorers and lmms-eval's on the same (altered) predictions: sentences, case, punctuation."""
    from lmms_eval.tasks.mme.utils import mme_aggregate_results, mme_process_results

    from vtprune.eval.data import load_task
    from vtprune.eval.tasks import get_task
    from vtprune.lmms.docs import doc_rows, gqa_results

    variants = ["Yes.", "no", "NO", "Yes, it is.", "maybe", "y"]
    rows = doc_rows("mme")[:12]
    preds = [variants[i % len(variants)] for i in range(len(rows))]
    per_doc = [mme_process_results(r, [p])["mme_perception_score"] for r, p in zip(rows, preds)]
    questions = load_task("mme", limit=12).questions
    by_key = dict(zip([(r["image_path"], r["question"]) for r in rows], preds))
    report = get_task("mme").score(questions, [by_key[(str(q.image_path), q.question)] for q in questions])
    assert mme_aggregate_results(per_doc) == pytest.approx(report.perception)
    gqa_rows = doc_rows("gqa")[:10]
    gqa_preds = [f" {r['answer'].upper()}." if i % 2 else "something" for i, r in enumerate(gqa_rows)]
    em = [gqa_results(r, [p])["exact_match"] for r, p in zip(gqa_rows, gqa_preds)]
    gqa_q = load_task("gqa", limit=10).questions
    gqa_by_key = dict(zip([(r["image_path"], r["question"]) for r in gqa_rows], gqa_preds))
    gqa_report = get_task("gqa").score(gqa_q, [gqa_by_key[(str(q.image_path), q.question)] for q in gqa_q])
    assert 100 * sum(em) / len(em) == pytest.approx(gqa_report.accuracy)


def test_odd_mme_limit_scores_whole_images_only():
    """An odd --limit answers one question of the last image: it is left out, where lmms-eval's own
    aggregation stops on its pairwise assertion."""
    from lmms_eval.tasks.mme.utils import mme_aggregate_results, mme_process_results

    from vtprune.lmms.docs import doc_rows, mme_aggregate

    rows = doc_rows("mme")[:7]
    per_doc = [mme_process_results(r, [r["answer"] if i % 3 else "no"])["mme_perception_score"]
               for i, r in enumerate(rows)]
    assert mme_aggregate(per_doc) == pytest.approx(mme_aggregate_results(per_doc[:6]))
    with pytest.raises(AssertionError):
        mme_aggregate_results(per_doc)


def test_data_parallel_two_cpu_processes(tmp_path):
    """torchrun with two CPU processes (gloo): each rank answers half the docs, rank 0 scores them all, with the
    stats of both ranks' requests."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lmms_eval",
           "--model", "vtprune", "--model_args", f"pretrained={TINY},method=fastv,ratio=0.75",
           "--include_path", str(TASKS_DIR), "--tasks", "vtprune_pope", "--limit", "4",
           "--output_path", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert "Running on rank 0" in log and "Running on rank 1" in log
    results = json.loads(next(out.rglob("*_results.json")).read_text())["results"]["vtprune_pope"]
    n_visual, _ = _config_numbers()
    assert results["vtprune_kept_tokens,none"] == n_visual // 4
    assert results["pope_accuracy,none"] is not None


def test_local_tasks_read_the_folder_named_by_the_environment(monkeypatch):
    """vtprune_*_local: the user's copy in the official layout (here the shipped synthetic MME / GQA folders,
    which use it); unset, a clear error and nothing is fetched."""
    import importlib.util

    from vtprune.eval.data import ASSET_DATA
    from vtprune.lmms.docs import doc_rows

    spec = importlib.util.spec_from_file_location("vtprune_pack_utils", TASKS_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    for task in ("mme", "gqa"):
        monkeypatch.delenv(f"VTPRUNE_{task.upper()}_DIR", raising=False)
        with pytest.raises(ValueError, match=f"set VTPRUNE_{task.upper()}_DIR"):
            getattr(utils, f"{task}_local_docs")(None)
        monkeypatch.setenv(f"VTPRUNE_{task.upper()}_DIR", str(ASSET_DATA[task]))
        assert getattr(utils, f"{task}_local_docs")(None).to_list() == doc_rows(task)
