"""``vtprune perf`` on tiny models: KV bytes of the cache tensors equal the analytic count (with and without
early-layer eviction), every record carries its fields, the derived ratios follow their definitions, and user
errors are one line with exit status 2. No timing is asserted."""

from __future__ import annotations

import json
import os
import statistics

import pytest
import torch

from vtprune import loading
from vtprune.eval.sweep import build_configs
from vtprune.cli import main
from vtprune.perf import suite as perf_suite

from ..conftest import IMAGE_TOKEN, collate, make_prompt

pytestmark = pytest.mark.usefixtures("one_thread")
FIELDS = ("name", "keep", "prefill_ms", "speedup", "oracle_fraction", "ideal_fraction", "overhead",
          "decode_ms_per_token", "kv_bytes", "kv_bytes_analytic", "flops")


@pytest.fixture(scope="module")
def tiny_run(models):
    model = models("llava")
    inputs = collate([make_prompt(model, "llava", 12, 0)])
    inputs.pop("attention_mask")
    configs = build_configs(["fastv", "random", "transprune"], keeps=[16])
    setups = perf_suite.plan_setups(model, inputs, configs, [16], evict=True)
    timings = perf_suite.run_perf(model, inputs, setups, rounds=1, warmup=0, decode_tokens=2)
    return model, inputs, perf_suite.records(model, inputs, setups, timings)


def _kv_bytes(tokens_per_layer, cfg) -> int:
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return sum(2 * cfg.num_key_value_heads * head_dim * n * 4 for n in tokens_per_layer)  # fp32


def test_every_configuration_ran_and_has_its_fields(tiny_run):
    _, _, rows = tiny_run
    labels = [r["label"] for r in rows]
    assert labels[:2] == ["vanilla", "oracle@16"]
    assert {"fastv@16", "random@16", "transprune@16", "fastv@16+evict", "replay[fastv@16]",
            "replay[transprune@16]"} <= set(labels)
    for r in rows:
        assert r["error"] is None, (r["label"], r["error"])
        for key in FIELDS:
            assert key in r
        assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0
        assert r["kind"] == "replay" or r["peer_ms"] > 0


def test_kv_bytes_of_the_cache_tensors_equal_the_analytic_count(tiny_run):
    model, inputs, rows = tiny_run
    cfg = model.config.text_config
    by = {r["label"]: r for r in rows}
    T = inputs["input_ids"].shape[1]
    n_visual = int((inputs["input_ids"] == IMAGE_TOKEN).sum())
    text = T - n_visual
    L = cfg.num_hidden_layers
    expected = {
        "vanilla": [T] * L,
        "oracle@16": [text + 16] * L,
        "random@16": [text + 16] * L,
        "fastv@16": [T] * 2 + [text + 16] * (L - 2),  # FastV K=2: layers 0-1 keep every visual token
        "fastv@16+evict": [text + 16] * L,  # evicted: every layer holds the final kept set
    }
    for label, tokens in expected.items():
        assert by[label]["kv_bytes"] == _kv_bytes(tokens, cfg), label
        assert by[label]["kv_bytes_analytic"] == _kv_bytes(tokens, cfg), label
    for r in rows:
        assert r["kv_bytes"] == r["kv_bytes_analytic"], r["label"]


def test_derived_ratios_follow_their_definitions(tiny_run):
    _, _, rows = tiny_run
    by = {r["label"]: r for r in rows}
    v, o, f, rep = by["vanilla"], by["oracle@16"], by["fastv@16"], by["replay[fastv@16]"]
    assert f["speedup"] == pytest.approx(v["prefill_ms"] / f["prefill_ms"])
    assert f["oracle_fraction"] == pytest.approx(o["prefill_ms"] / f["prefill_ms"])
    assert f["overhead"] == pytest.approx((f["prefill_ms"] - o["prefill_ms"]) / v["prefill_ms"])
    assert f["replay_fraction"] == pytest.approx(rep["prefill_ms"] / f["prefill_ms"])
    assert f["scoring_overhead"] == pytest.approx((f["prefill_ms"] - rep["prefill_ms"]) / v["prefill_ms"])
    total = lambda r: r["flops"]["vision"] + r["flops"]["projector"] + r["flops"]["llm_prefill"]  # noqa: E731
    assert f["ideal_speedup"] == pytest.approx(total(v) / total(f))
    assert f["ideal_fraction"] == pytest.approx(f["speedup"] / f["ideal_speedup"])
    assert o["oracle_fraction"] == pytest.approx(1.0) and o["overhead"] == pytest.approx(0.0)
    assert by["random@16"]["replay_fraction"] == pytest.approx(by["random@16"]["oracle_fraction"])  # LLM-input cut


def test_the_replay_has_the_method_s_flops_and_the_oracle_the_floor(tiny_run):
    _, _, rows = tiny_run
    by = {r["label"]: r for r in rows}
    assert by["replay[fastv@16]"]["flops"] == by["fastv@16"]["flops"]
    assert by["oracle@16"]["flops"] == by["random@16"]["flops"]
    assert by["oracle@16"]["flops"]["llm_prefill"] < by["fastv@16"]["flops"]["llm_prefill"]


def test_perf_cli_writes_results(tmp_path, capsys):
    out = tmp_path / "perf"
    status = main(["perf", "--methods", "fastv,vtc_cls", "--keep", "16", "--rounds", "1", "--warmup", "0",
                   "--decode-tokens", "2", "--threads", "1", "--out", str(out)])
    assert status == 0
    table = capsys.readouterr().out
    assert "oracle@16" in table and "fastv@16" in table and "targets" in table
    data = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in data["results"]]
    assert labels[:2] == ["vanilla", "oracle@16"] and "vtc_cls@16" in labels
    assert (out / "results.csv").read_text().startswith("label,")
    assert (out / "results.png").stat().st_size > 1000


@pytest.mark.parametrize("argv,message", [
    (["--keep", "12a"], "--keep 12a: expected comma-separated whole numbers"),
    (["--ratio", "1.5"], "--ratio 1.5: every ratio must be in [0, 1)"),
    (["--arch", "llava-9b"], "--arch llava-9b: unknown architecture; use one of"),
    (["--llm-layers", "2"], "--vision-layers / --llm-layers cut the depth of an --arch model"),
    (["--rounds", "0"], "--rounds 0: must be >= 1"),
    (["--methods", "fastvv"], "--methods fastvv:"),
    (["--device", "cuda:7"], "--device cuda:7"),
    (["--methods", "fastv", "--set", "foo=1"], "--methods fastv: vtprune: method 'fastv' got unknown keyword(s) foo"),
    (["--methods", "fastv", "--set", "layer=abc"], "--methods fastv: vtprune: fastv layer='abc' has the wrong type"),
    (["--warmup", "-1"], "--warmup -1: must be >= 0"),
])
def test_perf_cli_user_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    out = tmp_path / "never"
    monkeypatch.setattr(loading, "load_model", _no_load)
    assert main(["perf", *argv, "--out", str(out)]) == 2
    _assert_one_error(capsys, message)
    assert not out.exists()


def _no_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the command line was checked")


def _assert_one_error(capsys, message: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vtprune perf: error: ") and message in err[0], err


ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.mark.parametrize("case", ["under a file", "a file", "unwritable"])
def test_perf_cli_out_is_checked_before_the_run(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(loading, "load_model", _no_load)
    text = tmp_path / "notes.txt"
    text.write_text("not a folder")
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o500)
    out = {"under a file": text / "perf", "a file": text,
           "unwritable": "/proc/perf" if ROOT_USER else readonly / "perf"}[case]  # /proc refuses even root
    assert main(["perf", "--methods", "fastv", "--keep", "16", "--out", str(out)]) == 2
    _assert_one_error(capsys, f"--out {out}: ")
    readonly.chmod(0o700)


@pytest.mark.parametrize("argv,message", [
    (["--methods", "fastv", "--set", "layer=99"], "--methods fastv (fastv@keep16,layer=99): vtprune: fastv cuts "
                                                  "before LLM layer 99"),
    (["--methods", "var"], "var has no known sink dimensions for this LLM"),
    (["--set", "layer=2"], "got unknown keyword(s) layer"),  # the default methods are known once the model is
])
def test_perf_cli_configurations_the_model_refuses(tmp_path, capsys, tiny_model, argv, message):
    """Every configuration is pruned and unpruned on the built model first: a refused one is one line naming it,
    before anything is timed."""
    model, forwards = tiny_model
    out = tmp_path / "never"
    assert main(["perf", *argv, "--keep", "16", "--rounds", "1", "--warmup", "0", "--out", str(out)]) == 2
    _assert_one_error(capsys, message)
    assert not forwards and not hasattr(model, "vtprune") and not out.exists()


def test_perf_cli_a_failing_configuration_exits_1_with_its_traceback(tmp_path, capsys, tiny_model, broken_method):
    out = tmp_path / "perf"
    status = main(["perf", "--methods", f"{broken_method},random", "--keep", "16", "--rounds", "1", "--warmup", "0",
                   "--decode-tokens", "1", "--no-peer", "--no-replay", "--threads", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 1, err
    assert "Traceback (most recent call last)" in err and 'raise RuntimeError("boom")' in err
    assert "1 configuration(s) failed: _test_broken@16" in err
    rows = {r["label"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert "boom" in rows["_test_broken@16"]["error"] and rows["random@16"]["error"] is None


# ------------------------------------------------------------------------------------------------------------
# paired rounds, machine noise, every round kept (a scripted clock: no timing is measured or asserted)
ORACLE_MS = [50.0, 60.0, 40.0, 55.0]
METHOD_MS = [52.0, 70.0, 38.0, 80.0]  # median of the per-round ratios != ratio of the medians
QUIET, NOISY = [100.0, 101.0, 99.0, 100.0], [100.0, 80.0, 130.0, 100.0]


@pytest.fixture
def scripted_clock(monkeypatch):
    """Every timed generate of ``vtprune perf`` runs for real, then reports the next prefill ms scripted for the
    configuration being timed; returns (script: label -> ms per round, calls: labels in running order)."""
    from vtprune.perf import timing as perf

    script, calls, current = {}, [], {}
    run_once, timed_generate = perf_suite._run_once, perf.timed_generate

    def fake_run_once(model, inputs, setup, *args):
        current["label"] = setup.label
        calls.append(setup.label)
        return run_once(model, inputs, setup, *args)

    def fake_timed_generate(*args, **kwargs):
        clock, out = timed_generate(*args, **kwargs)
        ms = script[current["label"]][calls.count(current["label"]) - 1]
        clock.start = clock.stamps[0] - ms / 1000.0  # the first token ms after the start; later gaps unchanged
        return clock, out

    monkeypatch.setattr(perf_suite, "_run_once", fake_run_once)
    monkeypatch.setattr(perf, "timed_generate", fake_timed_generate)
    return script, calls


def _scripted_run(tmp_path, script, vanilla, rounds=4, extra=()):
    script.update({"vanilla": vanilla, "oracle@16": ORACLE_MS, "random@16": METHOD_MS})
    out = tmp_path / "perf"
    status = main(["perf", "--methods", "random", "--keep", "16", "--rounds", str(rounds), "--warmup", "0",
                   "--decode-tokens", "1", "--no-peer", "--no-replay", "--threads", "1", "--out", str(out), *extra])
    assert status == 0
    return json.loads((out / "results.json").read_text())


def _q(xs):
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q3


def test_perf_ratios_are_medians_of_paired_per_round_ratios(tmp_path, capsys, tiny_model, scripted_clock):
    script, _ = scripted_clock
    data = _scripted_run(tmp_path, script, NOISY)
    by = {r["label"]: r for r in data["results"]}
    m, o, v = by["random@16"], by["oracle@16"], by["vanilla"]
    for row, ms in ((v, NOISY), (o, ORACLE_MS), (m, METHOD_MS)):
        assert row["prefill_ms_rounds"] == pytest.approx(ms)
    fraction = [b / a for a, b in zip(METHOD_MS, ORACLE_MS)]
    total = lambda r: r["flops"]["vision"] + r["flops"]["projector"] + r["flops"]["llm_prefill"]  # noqa: E731
    ideal = total(v) / total(m)
    expected = {
        "ideal_fraction": [b / a / ideal for a, b in zip(METHOD_MS, NOISY)],
        "oracle_fraction": fraction,
        "speedup": [b / a for a, b in zip(METHOD_MS, NOISY)],
        "overhead": [(a - b) / c for a, b, c in zip(METHOD_MS, ORACLE_MS, NOISY)],
        "replay_fraction": fraction,  # an LLM-input method: its schedule's floor is the oracle
    }
    for key, per_round in expected.items():
        assert m[key] == pytest.approx(statistics.median(per_round)), key
        assert m[f"{key}_rounds"] == pytest.approx(per_round), key
        assert (m[f"{key}_q1"], m[f"{key}_q3"]) == pytest.approx(_q(per_round)), key
    ratio_of_medians = statistics.median(ORACLE_MS) / statistics.median(METHOD_MS)
    assert abs(m["oracle_fraction"] - ratio_of_medians) > 0.03  # the case tells the two apart
    table = capsys.readouterr().out
    assert f"{100 * statistics.median(fraction):.1f} ±" in table


@pytest.mark.parametrize("vanilla,warned", [(QUIET, False), (NOISY, True)])
def test_perf_prints_the_machine_noise_and_warns_above_10_percent(tmp_path, capsys, tiny_model, scripted_clock,
                                                                  vanilla, warned):
    script, _ = scripted_clock
    data = _scripted_run(tmp_path, script, vanilla)
    q1, q3 = _q(vanilla)
    iqr = (q3 - q1) / statistics.median(vanilla)
    noise = data["meta"]["noise"]
    assert noise["iqr"] == pytest.approx(iqr) and noise["warning"] is warned
    assert noise["range"] == pytest.approx((max(vanilla) - min(vanilla)) / statistics.median(vanilla))
    lines = capsys.readouterr().out.splitlines()
    noise_lines = [line for line in lines if line.startswith("machine noise:")]
    assert len(noise_lines) == 1 and f"{100 * iqr:.1f} %" in noise_lines[0]
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == warned and (not warned or "machine noise" in warnings[0])


def test_perf_alternates_the_round_order_and_keeps_every_round(tmp_path, capsys, tiny_model, scripted_clock):
    """Odd rounds run in reverse, so a method is not always timed right after its oracle; results.json keeps
    every round's ms, ratios and running position; results.csv stays one scalar per cell."""
    script, calls = scripted_clock
    data = _scripted_run(tmp_path, script, QUIET)
    forward = ["vanilla", "oracle@16", "random@16"]
    assert calls == (forward + forward[::-1]) * 2
    by = {r["label"]: r for r in data["results"]}
    assert by["vanilla"]["round_positions"] == [0, 2, 0, 2] and by["random@16"]["round_positions"] == [2, 0, 2, 0]
    assert len(by["random@16"]["decode_ms_rounds"]) == len(by["random@16"]["vision_ms_rounds"]) == 4
    header = (tmp_path / "perf" / "results.csv").read_text().splitlines()[0].split(",")
    assert "oracle_fraction_q1" in header and not any(k.endswith("_rounds") for k in header)


def test_perf_draws_no_progress_bar_when_stdout_is_not_a_terminal(tmp_path, capsys, monkeypatch, tiny_model,
                                                                   scripted_clock):
    """A CI log (stdout redirected, stderr still a terminal) gets one line per round, never a redrawn bar."""
    import sys

    script, _ = scripted_clock
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    _scripted_run(tmp_path, script, QUIET)
    err = capsys.readouterr().err
    assert "\r" not in err and "cfg/s" not in err
    assert [line for line in err.splitlines() if "round" in line] == [f"vtprune perf: round {i} of 4" for i in
                                                                      range(1, 5)]


def test_perf_cli_default_rounds_are_the_suite_s():
    """The CLI keeps its own literal (``vtprune -h`` imports no torch); both say the same number of rounds."""
    import argparse

    from vtprune.benchmarks import perf_cli

    p = argparse.ArgumentParser()
    perf_cli.add_arguments(p)
    assert p.parse_args([]).rounds == perf_suite.DEFAULT_ROUNDS >= 8


def test_zipvl_kv_modes_are_three_timed_configurations_with_their_own_kv_bytes(models):
    """`vtprune perf --methods zipvl` times each KV mode (sweep_variants) as its own row: distinct labels, and the
    packed store reports fewer KV bytes than the dense cache."""
    model = models("llava")
    inputs = collate([make_prompt(model, "llava", 12, 0)])
    inputs.pop("attention_mask")
    setups = perf_suite.plan_setups(model, inputs, build_configs(["zipvl"]), [])
    labels = [s.label for s in setups]
    assert labels == ["vanilla", "zipvl(kv_mode=none)", "zipvl(kv_mode=evict)", "zipvl(kv_mode=mixed)"]
    timings = perf_suite.run_perf(model, inputs, setups, rounds=1, warmup=0, decode_tokens=2)
    kv = {r["label"]: r["kv_bytes"] for r in perf_suite.records(model, inputs, setups, timings)}
    assert kv["zipvl(kv_mode=mixed)"] < kv["zipvl(kv_mode=none)"] == kv["vanilla"]
