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
