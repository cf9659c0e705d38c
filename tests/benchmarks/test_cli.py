"""``vtprune bench`` end to end on tiny subsets, the runner's plumbing (sharding, limits, scoring) and perf.py."""

import csv
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtprune
from vtprune import cli as top_cli
from vtprune import registry
from vtprune.benchmarks import cli as bench_cli
from vtprune import loading
from vtprune.benchmarks import runner, synthetic
from vtprune.eval import run as eval_run
from vtprune.eval.tasks.gqa import load_gqa, score_gqa
from vtprune.eval.tasks.mme import load_mme, score_mme
from vtprune.eval.tasks.prompts import build_prompt
from vtprune.perf import timing as perf
from vtprune.methods.base import Method

FAST = ["--max-new-tokens", "2", "--timing-samples", "1", "--timing-repeats", "1", "--decode-tokens", "1",
        "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-data")
    mme = synthetic.write_mme(root / "MME_Benchmark_release_version", per_subtask=2,
                              subtasks=("existence", "color", "OCR"))
    gqa = synthetic.write_gqa(root / "gqa", n_questions=7)
    return mme, gqa


def _load(out):
    results = json.loads((out / "results.json").read_text())
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return results, rows


def _check_outputs(out, labels, tasks, n_questions):
    results, rows = _load(out)
    assert set(results) == {"meta", "tasks", "runs"}
    assert [r["label"] for r in results["runs"]] == labels
    assert list(results["tasks"]) == tasks
    for run in results["runs"]:
        assert {"method", "keep", "ratio", "kept_tokens", "equivalent_tokens", "visual_tokens", "scores", "perf",
                "speedup", "predictions"} <= set(run)
        assert set(run["scores"]) == set(tasks) and set(run["predictions"]) == set(tasks)
        for task in tasks:
            assert len(run["predictions"][task]) == n_questions[task]
        if "mme" in tasks:
            mme = run["scores"]["mme"]
            assert {"perception", "cognition", "total", "subtasks", "score"} <= set(mme)
            assert all({"acc", "acc_plus", "score"} <= set(s) for s in mme["subtasks"].values())
        if "gqa" in tasks:
            assert 0.0 <= run["scores"]["gqa"]["accuracy"] <= 100.0
        assert set(run["perf"]) >= {"prefill_ms", "decode_ms_per_token", "kv_bytes", "prefill_flops",
                                    "peak_memory_bytes"}
        assert run["perf"]["prefill_ms"] > 0 and run["perf"]["kv_bytes"] > 0 and run["speedup"] > 0
    assert results["runs"][0]["speedup"] == pytest.approx(1.0)
    assert [r["label"] for r in rows] == labels
    assert {"kept_tokens", "equivalent_tokens", "prefill_ms", "speedup"} <= set(rows[0])
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return results


def _rescore(task, questions, run):
    preds = [p["prediction"] for p in run["predictions"][task]]
    ids = runner.prediction_ids(task, questions)
    assert [p["id"] for p in run["predictions"][task]] == ids
    report = score_mme(questions, preds) if task == "mme" else score_gqa(questions, preds)
    return runner.task_score(task, report)


# ----------------------------------------------------------------------------------------------------------
# end to end
def test_bench_default_data_end_to_end(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VTPRUNE_CACHE_DIR", str(tmp_path / "cache"))  # if the synthetic sets are not shipped
    out = tmp_path / "out"
    status = top_cli.main(["bench", "--model", str(tiny[0]), "--limit", "4", "--methods", "random", "--keep", "16",
                           "--out", str(out), *FAST])
    assert status == 0
    printed = capsys.readouterr().out
    assert "vanilla" in printed and "random" in printed and "speed-up" in printed and "MME-P" in printed
    results = _check_outputs(out, ["vanilla", "random@keep16"], ["mme", "gqa"], {"mme": 4, "gqa": 4})
    vanilla, pruned = results["runs"]
    assert vanilla["kept_tokens"] == vanilla["equivalent_tokens"] == 144
    assert pruned["kept_tokens"] == pruned["equivalent_tokens"] == 16 and pruned["keep"] == 16
    assert pruned["perf"]["kv_bytes"] < vanilla["perf"]["kv_bytes"]
    assert pruned["perf"]["prefill_flops"] < vanilla["perf"]["prefill_flops"]
    # the reported scores are the scorers' output on the reported predictions
    for task in ("mme", "gqa"):
        questions = runner.load_task(task, results["tasks"][task]["data"], limit=4).questions
        for run in results["runs"]:
            assert run["scores"][task]["score"] == pytest.approx(_rescore(task, questions, run))
    mme_files = out / "predictions" / "random@keep16" / "mme"
    assert sorted(p.name for p in mme_files.iterdir())  # official eval_tool layout written
    assert (out / "predictions" / "vanilla" / "gqa_predictions.json").is_file()


def test_bench_data_folders(tiny, data, tmp_path):
    mme, gqa = data
    out = tmp_path / "out"
    status = bench_cli.main(["--model", str(tiny[0]), "--data", str(mme), "--data", f"gqa={gqa}",
                             "--methods", "fastv", "--keep", "32", "--batch-size", "3", "--out", str(out), *FAST])
    assert status == 0
    results = _check_outputs(out, ["vanilla", "fastv@keep32"], ["mme", "gqa"], {"mme": 12, "gqa": 7})
    assert results["tasks"]["mme"]["data"] == str(mme) and results["tasks"]["gqa"]["data"] == str(gqa)
    fastv = results["runs"][1]
    assert fastv["kept_tokens"] == 32 and fastv["equivalent_tokens"] == pytest.approx((144 * 2 + 32 * 2) / 4)
    assert list(fastv["scores"]["mme"]["subtasks"]) == ["existence", "color", "OCR"]
    assert results["tasks"]["mme"]["metric"] == "MME Perception"


def test_task_and_data_resolution(data, tmp_path):
    mme, gqa = data
    assert runner.detect_task(mme) == "mme" and runner.detect_task(gqa) == "gqa"
    assert bench_cli.parse_data("all", []) == (["mme", "gqa"], {})
    assert bench_cli.parse_data("all", [str(gqa)]) == (["gqa"], {"gqa": gqa})
    assert bench_cli.parse_data("mme", [f"mme={mme}"]) == (["mme"], {"mme": mme})
    with pytest.raises(ValueError, match="--task mme but --data points to a gqa folder"):
        bench_cli.parse_data("mme", [str(gqa)])
    with pytest.raises(ValueError, match="neither an MME"):
        (tmp_path / "empty").mkdir()
        runner.detect_task(tmp_path / "empty")


def test_unknown_method_is_a_clear_error(capsys):
    status = top_cli.main(["bench", "--methods", "random,fastvv", "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2
    assert "vtprune bench: error: vtprune: unknown method 'fastvv'. Did you mean 'fastv'?" in err
    assert "Available:" in err
    assert bench_cli.main(["--methods", "visonzip"]) == 2
    assert "Did you mean 'visionzip'" in capsys.readouterr().err


def test_cli_structure(capsys):
    with pytest.raises(SystemExit) as exc:  # no sub-command: a one-line user error naming the commands
        top_cli.main([])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("vtprune: error: give a command: bench, methods, viz") and "perf" in err
    assert top_cli.main(["methods"]) == 0
    assert "fastv" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        top_cli.main(["bench", "--task", "vqa"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        top_cli.main(["bench", "--keep", "a,b"])


def _gqa_images_in_order(root):
    """The image file of each question of a synthetic GQA folder, in question-id order (read from the JSON)."""
    questions = json.loads((root / "testdev_balanced_questions.json").read_text())
    return [root / "images" / f"{questions[q]['imageId']}.png" for q in sorted(questions)]


def _damage(path, how, monkeypatch):
    from PIL import Image

    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "not an image":
        path.write_text("GIF89a? no: a text file with an image name\n")
    elif how.startswith("bomb"):  # 40000 pixels (the other images have 9216): over the limit, and for "error"
        Image.new("RGB", (200, 200)).save(path)  # over twice the limit (PIL only warns under that)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30000 if how == "bomb warning" else 15000)
    else:  # another image under the same name: which one is meant is ambiguous
        path.with_suffix(".jpg").write_bytes(data)


@pytest.mark.parametrize("how,reason", [
    ("empty", "empty image file (0 bytes)"), ("truncated", "not an image PIL can decode (OSError: "),
    ("not an image", "PIL does not recognise its format"), ("bomb warning", "decompression bomb"),
    ("bomb error", "decompression bomb"), ("two files", "2 image files match"),
])
def test_a_broken_or_ambiguous_image_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys, how, reason):
    gqa = synthetic.write_gqa(tmp_path / "gqa", n_questions=6)
    bad = _gqa_images_in_order(gqa)[1]  # used by the second question: inside --limit 2
    _damage(bad, how, monkeypatch)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    status = top_cli.main(["bench", "--data", str(gqa), "--limit", "2", "--methods", "random", "--keep", "16",
                           "--out", str(tmp_path / "out"), *FAST])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith(f"vtprune bench: error: --data {gqa}: ") and str(bad) in err and reason in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_ambiguous_data_folders_are_one_line_naming_the_files_or_id(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    mme = synthetic.write_mme(tmp_path / "mme", per_subtask=2, subtasks=("color",))
    png = mme / "color" / "0001.png"
    jpg = png.with_suffix(".jpg")
    jpg.write_bytes(png.read_bytes())
    assert top_cli.main(["bench", "--data", str(mme), "--out", str(tmp_path / "out"), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(png) in err and str(jpg) in err
    gqa = synthetic.write_gqa(tmp_path / "gqa", n_questions=3)
    qfile = gqa / "testdev_balanced_questions.json"
    qid, entry = next(iter(json.loads(qfile.read_text()).items()))
    qfile.write_text(qfile.read_text().rstrip().removesuffix("}") + f", {json.dumps(qid)}: {json.dumps(entry)}}}")
    assert top_cli.main(["bench", "--data", str(gqa), "--out", str(tmp_path / "out"), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{qfile}: question id {qid!r} is given twice" in err


def test_only_the_selected_questions_images_are_decoded(tmp_path):
    gqa = synthetic.write_gqa(tmp_path / "gqa", n_questions=6)
    images = _gqa_images_in_order(gqa)
    unused = next(p for p in images[2:] if p not in images[:2])
    unused.write_bytes(b"")
    assert len(runner.load_task("gqa", gqa, limit=2).questions) == 2  # --limit 2 never uses it
    with pytest.raises(ValueError, match=f"{unused}: empty image file"):
        runner.load_task("gqa", gqa)


def _exit_status(argv) -> int:
    """``vtprune ...`` as a shell runs it: argparse's own errors exit through SystemExit."""
    try:
        return top_cli.main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("flag", ["--decode-tokens", "--timing-samples", "--timing-repeats", "--limit",
                                  "--batch-size", "--max-new-tokens", "--threads"])
def test_every_count_flag_refuses_a_negative_value(tmp_path, monkeypatch, capsys, flag):
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(eval_run, "load_task", lambda *a, **k: pytest.fail("the data was loaded"))
    status = _exit_status(["bench", "--out", str(tmp_path / "out"), "--no-progress", flag, "-1"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and err.startswith("vtprune bench: error: "), err
    assert flag in err and "-1" in err and "must be >= " in err
    settings = runner.BenchSettings(out=tmp_path / "out", progress=False)
    if flag in ("--decode-tokens", "--timing-samples", "--timing-repeats", "--threads"):  # the others: __post_init__
        setattr(settings, flag[2:].replace("-", "_"), -1)  # from Python: refused before any work too
        with pytest.raises(top_cli.UsageError, match=f"^{flag} -1: must be >= "):
            runner.run_bench(settings)


# ----------------------------------------------------------------------------------------------------------
# runner plumbing
def test_runner_scores_match_hand_fed_predictions(tiny, data, tmp_path):
    """A predictor that answers from a fixed table: the runner's scores equal the scorers' on that table."""
    mme, gqa = data
    _, model, processor = tiny
    mme_q, gqa_q = load_mme(mme), load_gqa(gqa)
    mme_preds = [["Yes", "no.", "maybe", "No", "yes", "y"][i % 6] for i in range(len(mme_q))]
    gqa_preds = [q.answer.upper() + "." if i % 3 else "wrong" for i, q in enumerate(gqa_q)]
    table = {"mme": mme_preds, "gqa": gqa_preds}

    def predictor(model, processor, task, indices, prompts, settings):
        assert all(prompts[i].endswith("ASSISTANT:") for i in indices)
        return [table[task.name][i] for i in indices], runner.TokenCounts(len(indices), 144.0 * len(indices),
                                                                          10.0 * len(indices), 20.0 * len(indices))

    settings = runner.BenchSettings(data={"mme": mme, "gqa": gqa}, methods=["random"], keeps=[8], batch_size=5,
                                    timing_samples=0, progress=False, out=tmp_path / "out")
    results = runner.run_bench(settings, model=model, processor=processor, predictor=predictor)
    expected_mme, expected_gqa = score_mme(mme_q, mme_preds), score_gqa(gqa_q, gqa_preds)
    assert 0 < expected_mme.total < expected_mme.total_max and 0 < expected_gqa.accuracy < 100
    for run in results["runs"]:
        assert run["scores"]["mme"] == {**expected_mme.to_dict(), "score": expected_mme.total}
        assert run["scores"]["gqa"] == {**expected_gqa.to_dict(), "score": expected_gqa.accuracy}
        assert [p["prediction"] for p in run["predictions"]["gqa"]] == gqa_preds
        assert (run["kept_tokens"], run["equivalent_tokens"]) == (10.0, 20.0)
        assert run["perf"]["prefill_ms"] is None and run["speedup"] is None
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["runs"][1]["scores"] == results["runs"][1]["scores"]
    assert "MME-P/600" in runner.format_table(results)


def test_a_failing_method_is_reported_and_the_sweep_goes_on(tiny, data, tmp_path, capsys, broken_method):
    _, gqa = data
    _, model, processor = tiny
    settings = runner.BenchSettings(tasks=("gqa",), data={"gqa": gqa}, methods=[broken_method, "random"],
                                    keeps=[16], limit=2, max_new_tokens=1, timing_samples=1, timing_repeats=1,
                                    decode_tokens=0, threads=1, progress=False, out=tmp_path / "out")
    results = runner.run_bench(settings, model=model, processor=processor)
    broken, random_run = results["runs"][1:]
    assert "boom" in broken["error"] and broken["scores"] == {} and broken["perf"]["prefill_ms"] is None
    assert "error" not in random_run and random_run["perf"]["prefill_ms"] > 0 and random_run["kept_tokens"] == 16
    assert not hasattr(model, "vtprune")  # restored unpruned
    err = capsys.readouterr().err
    assert "_test_broken@keep16 failed" in err
    assert "Traceback (most recent call last)" in err and 'raise RuntimeError("boom")' in err  # the cause's trace
    table = runner.format_table(results)
    assert "failed configurations:" in table and "boom" in table
    assert (tmp_path / "out" / "results.png").is_file()


def _run_entry(method, keep, kept, equiv, score):
    return {"label": f"{method}@keep{keep}" if keep else method, "method": method, "keep": keep, "ratio": None,
            "config": None, "visual_tokens": 144.0, "kept_tokens": kept, "equivalent_tokens": equiv,
            "scores": {"gqa": {"accuracy": score, "score": score}}, "speedup": None, "predictions": {},
            "perf": {"prefill_ms": None, "decode_ms_per_token": None, "kv_bytes": None, "prefill_flops": None}}


def test_plot_puts_each_run_at_its_equivalent_tokens_and_the_table_keeps_both(tmp_path, monkeypatch):
    """FastV at keep 16 keeps 16 tokens after layer 2 but its first two layers see all 144: equal cost means the
    layer-averaged count, so the plot's x is that, and the table shows the nominal keep, kept and equivalent."""
    import matplotlib.pyplot as plt

    runs = [_run_entry("vanilla", None, 144.0, 144.0, 60.0), _run_entry("fastv", 32, 32.0, 60.0, 55.0),
            _run_entry("fastv", 16, 16.0, 48.0, 50.0), _run_entry("random", 16, 16.0, 16.0, 40.0)]
    results = {"meta": {"model": {"name": "tiny"}, "visual_tokens": 144, "settings": {"timing_samples": 0}},
               "tasks": {"gqa": {"data": "x", "questions": 1, "metric": "GQA accuracy (%)"}}, "runs": runs}
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure plot_results draws, to read it back
    runner.plot_results(results, tmp_path / "plot.png")
    (ax,) = figures[0].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["fastv"].get_xdata()) == [48.0, 60.0] and list(lines["fastv"].get_ydata()) == [50.0, 55.0]
    assert list(lines["random"].get_xdata()) == [16.0]
    assert "equivalent" in ax.get_xlabel()
    assert sorted(t.get_text() for t in ax.texts) == ["keep 16", "keep 16", "keep 32"]  # the nominal budgets
    header, rows = runner._table_rows(results)
    assert header[:4] == ["method", "budget", "kept", "equiv"]
    assert rows[2][:4] == ["fastv", "keep 16", "16.0", "48.0"]
    assert {"keep", "kept_tokens", "equivalent_tokens"} <= set(runner._csv_rows(results)[2])
    assert runner._csv_rows(results)[2]["equivalent_tokens"] == 48.0
    monkeypatch.undo()
    plt.close(figures[0])


@pytest.mark.parametrize("terminal", [False, True])
def test_bench_progress_bar_only_in_a_terminal(tiny, data, tmp_path, monkeypatch, capsys, terminal):
    from vtprune import progress

    _, gqa = data
    _, model, processor = tiny
    monkeypatch.setattr(progress, "interactive", lambda: terminal)  # capsys' streams are never terminals

    def predictor(model, processor, task, indices, prompts, settings):
        return ["yes"] * len(indices), runner.TokenCounts(len(indices), 144.0 * len(indices), 144.0 * len(indices),
                                                          144.0 * len(indices))

    settings = runner.BenchSettings(tasks=("gqa",), data={"gqa": gqa}, methods=["random"], keeps=[16], limit=2,
                                    timing_samples=0, progress=True, out=tmp_path / "out")
    runner.run_bench(settings, model=model, processor=processor, predictor=predictor)
    err = capsys.readouterr().err
    assert ("4/4" in err) is terminal  # 2 questions x 2 configurations: tqdm's count, drawn only for a person
    assert ("\r" in err) is terminal


def test_default_methods_scaled_keeps_and_configs():
    assert runner.scaled_keeps(144) == [48, 32, 16]
    assert runner.scaled_keeps(576) == [192, 128, 64]
    assert runner.scaled_keeps(2) == [1]

    @dataclass
    class OnlyModulates(Method):
        name: ClassVar[str] = "_test_modulation_only"
        prunes: ClassVar[bool] = False

    registry.register(OnlyModulates)
    try:
        assert "_test_modulation_only" in vtprune.list_methods()
        assert "_test_modulation_only" not in runner.default_methods()
    finally:
        registry._METHODS.pop("_test_modulation_only")
    assert {"random", "fastv", "visionzip"} <= set(runner.default_methods())
    configs = runner.build_configs(["random", "fastv"], keeps=[48, 16], ratios=[0.5], seed=3)
    assert [c.label for c in configs] == ["vanilla", "random@keep48", "random@keep16", "random@ratio0.5",
                                          "fastv@keep48", "fastv@keep16", "fastv@ratio0.5"]
    assert configs[1].prune_kwargs() == {"keep": 48, "seed": 3}
    with pytest.raises(ValueError, match="Did you mean 'random'"):
        runner.build_configs(["randon"], keeps=[4])


def test_limit_mme_keeps_image_pairs_round_robin(data):
    mme, _ = data
    questions = load_mme(mme)
    subset = runner.limit_mme(questions, 5)  # 3 images, one per subtask
    assert len(subset) == 6
    assert sorted({q.subtask for q in subset}) == ["OCR", "color", "existence"]
    score_mme(subset, ["yes"] * len(subset))  # every image still has its two questions
    assert runner.limit_mme(questions, None) == questions
    assert runner.limit_mme(questions, 1000) == questions


@pytest.mark.parametrize("n,batch,world", [(10, 3, 2), (7, 2, 3), (4, 16, 2), (1, 1, 4)])
def test_shards_cover_every_question_once(n, batch, world):
    shards = [runner.shard_batches(n, batch, r, world) for r in range(world)]
    flat = sorted(i for shard in shards for b in shard for i in b)
    assert flat == list(range(n))
    assert [b for b in runner.shard_batches(n, batch)] == [list(range(i, min(i + batch, n)))
                                                          for i in range(0, n, batch)]


# ----------------------------------------------------------------------------------------------------------
# perf
def test_flops_formula_and_layer_counts(tiny, data):
    _, model, processor = tiny
    n_layers, d, m = perf.llm_dims(model)
    assert perf.layer_flops(10, d, m) == 4 * 10 * d * d + 2 * 100 * d + 2 * 10 * d * m
    assert perf.prefill_flops([10, 10, 4, 4], d, m) == 2 * perf.layer_flops(10, d, m) + 2 * perf.layer_flops(4, d, m)
    _, gqa = data
    q = load_gqa(gqa)[:2]
    prompts = [build_prompt(x.question, benchmark="gqa", processor=processor) for x in q]
    inputs = runner.encode(processor, [x.image_path for x in q], prompts, model)
    lengths = inputs["attention_mask"].sum(1).tolist()
    assert perf.batch_prefill_flops(model, inputs) == [perf.prefill_flops([n] * n_layers, d, m) for n in lengths]
    with vtprune.pruned(model, "fastv", keep=32, layer=2):
        perf.prefill(model, inputs)
        stats = model.vtprune.stats
        flops = perf.batch_prefill_flops(model, inputs, stats)
    expected = [perf.prefill_flops([n, n, n - 112, n - 112], d, m) for n in lengths]
    assert flops == pytest.approx(expected)


def test_measure_reports_kv_bytes_and_latency(tiny, data):
    _, model, processor = tiny
    _, gqa = data
    q = load_gqa(gqa)[0]
    inputs = runner.encode(processor, [q.image_path], [build_prompt(q.question, processor=processor)], model)
    T = inputs["input_ids"].shape[1]
    cfg = model.config.text_config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    full = perf.measure(model, inputs, repeats=1, decode_tokens=1)
    assert full.kv_bytes == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * T * head_dim * 4
    assert full.prefill_ms > 0 and full.decode_ms_per_token >= 0 and full.peak_memory_bytes is None
    with vtprune.pruned(model, "random", keep=16):
        small = perf.measure(model, [inputs], repeats=1, decode_tokens=0)
    assert small.kv_bytes == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (T - 128) * head_dim * 4
    assert small.decode_ms_per_token is None and small.prefill_flops < full.prefill_flops
    assert perf.kv_cache_bytes(None) == 0
    k = torch.zeros(1, 2, 3, 4)
    assert perf.kv_cache_bytes([(k, k), (k, k)]) == 4 * k.nbytes
