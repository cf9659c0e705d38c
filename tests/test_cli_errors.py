"""`vtprune viz` / `bench` / `train-dyvte` / `calibrate-sinks` user errors: one stderr line, exit status 2, before any
model is loaded (or, for what only the model can tell, right after loading it and before any forward)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from vtprune import cli as top_cli
from vtprune import loading
from vtprune.eval import run as runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0  # root writes into read-only folders, not into /proc
REAL_LOAD_MODEL, REAL_LOAD_TASK = loading.load_model, runner.load_task  # before no_model_load replaces them


@pytest.fixture(autouse=True)
def no_model_load(monkeypatch):
    """Any model load or data load is a failure: the errors must be found before."""
    def fail(*args, **kwargs):
        raise AssertionError("a model or data set was loaded before the command line was checked")

    monkeypatch.setattr(loading, "load_model", fail)
    monkeypatch.setattr(runner, "load_task", fail)


@pytest.fixture
def files(tmp_path):
    image = tmp_path / "shapes.png"
    Image.new("RGB", (32, 32), "red").save(image)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    unwritable = "/proc" if ROOT_USER else readonly  # /proc refuses new files even to root
    yield {"image": image, "text": text, "dir": tmp_path, "readonly": unwritable}
    readonly.chmod(0o700)


def _one_error(capsys, argv, prog):
    try:
        status = top_cli.main(argv)
    except SystemExit as exc:  # argparse's own errors exit from parse_args
        status = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def _flags(args: dict) -> list:
    """{flag: value} as argv: True = a bare flag, None = left out."""
    return [x for key, value in args.items() if value is not None
            for x in ([key] if value is True else [key, str(value)])]


def _viz(f, **over):
    args = {"--image": f["image"], "--question": "q", "--method": "random", "--keep": "4",
            "--out": f["dir"] / "kept.png"}
    return ["viz", *_flags({**args, **over})]


VIZ_ERRORS = {
    "missing image": (lambda f: {"--image": f["dir"] / "nope.png"}, "no such file"),
    "not an image": (lambda f: {"--image": f["text"]}, "not an image"),
    "image is a folder": (lambda f: {"--image": f["dir"]}, "is a folder"),
    "image not a regular file": (lambda f: {"--image": os.devnull}, "not a regular file"),
    "out is a folder": (lambda f: {"--out": f["dir"]}, "is a folder"),
    "out under a file": (lambda f: {"--out": f["text"] / "kept.png"}, "is a file"),
    "out without image type": (lambda f: {"--out": f["dir"] / "kept"}, "unknown image type"),
    "missing model": (lambda f: {"--model": f["dir"] / "no-model"}, "no such folder"),
    "set without =": (lambda f: {"--set": "layer"}, "KEY=VALUE"),
    "set empty key": (lambda f: {"--set": "=3"}, "KEY=VALUE"),
    "unknown field": (lambda f: {"--set": "cumulative_weight=0.5"}, "cumulative_weight"),
    "unknown method": (lambda f: {"--method": "randon"}, "Did you mean 'random'"),
    "keep 0": (lambda f: {"--keep": "0"}, "keep"),
    "ratio 1": (lambda f: {"--keep": None, "--ratio": "1.0"}, "ratio"),
    "device nonsense": (lambda f: {"--device": "nonsense"}, "not a device"),
    "no budget": (lambda f: {"--keep": None}, "--method random prunes to a budget: give --keep N"),
    "budget for dyvte": (lambda f: {"--method": "dyvte"}, "dyvte"),
    "modulator": (lambda f: {"--method": "var", "--keep": None}, "only modulates attention"),
}


@pytest.mark.parametrize("case", list(VIZ_ERRORS))
def test_viz_user_errors(files, capsys, case):
    over, expected = VIZ_ERRORS[case]
    line = _one_error(capsys, _viz(files, **over(files)), "vtprune viz")
    assert expected in line


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A PNG of a few hundred bytes whose header declares width x height RGB pixels (one row of data follows)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    row = zlib.compress(b"\x00" * (1 + 3 * width))  # filter byte + one row: the rest is missing
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b""))
    return path


def _truncated_jpeg(path: Path) -> Path:
    noise = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    noise.save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # the header is whole: PIL opens it; decoding runs out of data
    return path


@pytest.mark.parametrize("case", ["truncated jpeg", "bomb over twice the limit", "bomb over the limit"])
def test_viz_image_that_does_not_decode(files, capsys, monkeypatch, case):
    """Found by decoding the image in full before the model is loaded: one line naming the file, exit 2."""
    limit = Image.MAX_IMAGE_PIXELS
    side = {"bomb over twice the limit": 2, "bomb over the limit": 1.2}.get(case)
    image = (_truncated_jpeg(files["dir"] / "cut.jpg") if side is None else
             _png_declaring(files["dir"] / "bomb.png", int((side * limit) ** 0.5) + 1, int((side * limit) ** 0.5) + 1))
    loads = []
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: loads.append(1))
    line = _one_error(capsys, _viz(files, **{"--image": image}), "vtprune viz")
    assert f"--image {image}: " in line and not loads
    assert ("not an image PIL can decode" in line) if side is None else ("decompression bomb" in line and str(limit) in line)


@pytest.mark.skipif(ROOT_USER and not os.path.isdir("/proc"), reason="root can write into a read-only folder")
def test_viz_out_in_read_only_folder(files, capsys):
    assert "cannot write" in _one_error(capsys, _viz(files, **{"--out": Path(files["readonly"]) / "kept.png"}),
                                        "vtprune viz")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is there")
def test_viz_cuda_without_cuda(files, capsys):
    assert "no CUDA" in _one_error(capsys, _viz(files, **{"--device": "cuda"}), "vtprune viz")


BENCH_ERRORS = {
    "device nonsense": (["--device", "nonsense"], "not a device"),
    "keep 0": (["--keep", "0"], "--keep 0: must be positive"),
    "keep -5": (["--keep", "-5"], "--keep -5: must be positive"),
    "ratio 1.0": (["--ratio", "1.0"], "--ratio 1.0: must be in [0, 1)"),
    "ratio nan": (["--ratio", "nan"], "--ratio nan: must be in [0, 1)"),
    "out is a file": (["--out", "{text}"], "is a file"),
    "out under a file": (["--out", "{text}/bench"], "is a file"),
    "missing model": (["--model", "{dir}/no-model"], "no such folder"),
    "model is a file": (["--model", "{text}"], "is a file"),
    "missing config": (["--config", "{dir}/nope.yaml"], "--config"),
    "bad config": (["--config", "{text}"], "--config"),
    "set without =": (["--set", "layer"], "KEY=VALUE"),
    "set budget": (["--set", "keep=4"], "--keep"),
    "set unknown field": (["--methods", "random", "--set", "layer=3"], "layer"),
    "methods twice": (["--methods", "fastv,fastv"], "given twice"),
    "unknown task": (["--task", "vqa"], "unknown task vqa; choose from mme, gqa, pope"),
    "unknown method": (["--methods", "fastvv"], "Did you mean 'fastv'"),
    "missing data": (["--data", "{dir}/nope"], "--data {dir}/nope: folder {dir}/nope does not exist"),
    "data is a file": (["--data", "{text}"], "--data {text}: {text} is a file; give the benchmark folder"),
    "task data is a file": (["--data", "gqa={text}"], "--data gqa={text}: {text} is a file; give the benchmark"),
}


@pytest.mark.parametrize("case", list(BENCH_ERRORS))
def test_bench_user_errors(files, capsys, case):
    flags, expected = BENCH_ERRORS[case]
    flags = [x.format(**{k: str(v) for k, v in files.items()}) for x in flags]
    expected = expected.format(**{k: str(v) for k, v in files.items()})
    out = [] if "--out" in flags else ["--out", str(files["dir"] / "bench")]
    line = _one_error(capsys, ["bench", "--no-progress", *out, *flags], "vtprune bench")
    assert expected in line


@pytest.mark.skipif(ROOT_USER and not os.path.isdir("/proc"), reason="root can write into a read-only folder")
def test_bench_out_in_read_only_folder(files, capsys):
    line = _one_error(capsys, ["bench", "--out", str(Path(files["readonly"]) / "bench")], "vtprune bench")
    assert "cannot write" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is there")
def test_bench_cuda_without_cuda(files, capsys):
    line = _one_error(capsys, ["bench", "--device", "cuda", "--out", str(files["dir"])], "vtprune bench")
    assert "no CUDA" in line and "--device cpu" in line


def test_bench_internal_errors_keep_their_traceback(monkeypatch, files):
    """Only bad input is shortened: a ValueError from inside the run propagates."""
    def broken(settings):
        raise ValueError("an internal bug")

    monkeypatch.setattr(runner, "_load_tasks", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        top_cli.main(["bench", "--methods", "random", "--keep", "4", "--out", str(files["dir"]), "--no-progress"])


def test_viz_internal_errors_keep_their_traceback(monkeypatch, files):
    from vtprune import viz
    from vtprune.benchmarks import tiny_llava

    model, processor = tiny_llava.build_untrained_tiny_llava(seed=0)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (model, processor, {}))

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(viz, "kept_token_pictures", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        top_cli.main(_viz(files))


def test_viz_keep_above_the_models_tokens(monkeypatch, files, capsys):
    """Checked once the model is known, still one line and before any forward."""
    from vtprune.benchmarks import tiny_llava

    model, processor = tiny_llava.build_untrained_tiny_llava(seed=0)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (model, processor, {}))
    line = _one_error(capsys, _viz(files, **{"--keep": "500"}), "vtprune viz")
    assert "--keep 500" in line and "144" in line and not hasattr(model, "vtprune")


@pytest.mark.parametrize("argv, prog", [
    (["-m", "vtprune.benchmarks", "--keep", "0", "--limit", "1", "--timing-samples", "0", "--no-progress"],
     "vtprune-bench"),
    (["-m", "vtprune.cli", "viz", "--image", "missing.png", "--question", "q", "--method", "random", "--keep", "4"],
     "vtprune viz"),
    (["-m", "vtprune.cli", "viz", "--image", os.path.join(ROOT, "vtprune", "assets", "synthetic_gqa", "images",
                                                          "syn00000.png"),
      "--question", "q", "--method", "random", "--keep", "4", "--device", "nonsense"], "vtprune viz"),
])
def test_entry_points_exit_2_with_one_line(tmp_path, argv, prog):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), done.stderr


def test_viz_config_the_model_refuses(files, capsys, tiny_model):
    """A layer beyond the model is refused by prune(): one line once the model is loaded, before the forward."""
    model, forwards = tiny_model
    line = _one_error(capsys, _viz(files, **{"--method": "fastv", "--set": "layer=99"}), "vtprune viz")
    assert "layer 99" in line and "1..3" in line
    assert not forwards and not hasattr(model, "vtprune") and not (files["dir"] / "kept.png").exists()


@pytest.mark.parametrize("source", ["set", "config"])
def test_bench_config_the_model_refuses(files, capsys, tiny_model, monkeypatch, source):
    """Every configuration is pruned and unpruned on the loaded model first: a refused one is one line naming it,
    and not even vanilla ran."""
    model, forwards = tiny_model
    monkeypatch.setattr(runner, "load_task", REAL_LOAD_TASK)
    config = files["dir"] / "deep.yaml"
    config.write_text("method: fastv\nlayer: 9\n")
    flags = (["--methods", "fastv", "--set", "layer=99"] if source == "set" else ["--config", str(config)])
    line = _one_error(capsys, ["bench", "--no-progress", "--task", "gqa", "--limit", "2", "--keep", "8",
                               "--out", str(files["dir"] / "bench"), *flags], "vtprune bench")
    expected = "--methods fastv (fastv@keep8,layer=99)" if source == "set" else "--config deep (fastv@keep8[deep])"
    assert expected in line and "1..3" in line
    assert not forwards and not hasattr(model, "vtprune") and not (files["dir"] / "bench" / "results.json").exists()


def test_model_loading_prints_no_progress_bar(capfd):
    """transformers' "Loading weights" bar would be a second stderr line before a model-dependent error."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    REAL_LOAD_MODEL(None, "float32", "cpu")
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled() == bars  # restored after the load


TRAIN_ERRORS = {
    "steps 0": ({"--steps": "0"}, "--steps 0: must be >= 1"),
    "batch-size 0": ({"--batch-size": "0"}, "--batch-size 0: must be >= 1"),
    "width 0": ({"--width": "0"}, "--width 0: must be >= 1"),
    "lr nan": ({"--lr": "nan"}, "--lr nan: must be a finite number > 0"),
    "lr inf": ({"--lr": "inf"}, "--lr inf: must be a finite number > 0"),
    "minutes -1": ({"--minutes": "-1"}, "--minutes -1: must be a finite number > 0"),
    "minutes 0": ({"--minutes": "0"}, "--minutes 0: must be a finite number > 0"),
    "minutes nan": ({"--minutes": "nan"}, "--minutes nan: must be a finite number > 0"),
    "missing data": ({"--data": "{dir}/nope"}, "not a folder"),
    "missing model": ({"--model": "{dir}/no-model"}, "no such folder"),
    "out under a file": ({"--out": "{text}/dyvte"}, "is a file"),
}


@pytest.mark.parametrize("case", list(TRAIN_ERRORS))
def test_train_dyvte_user_errors(files, capsys, case):
    over, expected = TRAIN_ERRORS[case]
    fmt = {k: str(v) for k, v in files.items()}
    argv = [x.format(**fmt) for x in _flags({"--out": "{dir}/dyvte", "--steps": "1", **over})]
    assert expected in _one_error(capsys, ["train-dyvte", "--no-progress", *argv], "vtprune train-dyvte")


@pytest.mark.parametrize("case", ["truncated", "empty", "another file"])
def test_train_dyvte_state_that_does_not_resume(files, capsys, case):
    """A state.pt in --out that does not load (cut short by a kill during an in-place save) or is no train-dyvte
    state: one line naming it and the fix, before the model is loaded (no_model_load)."""
    out = files["dir"] / "dyvte"
    out.mkdir()
    state = out / "state.pt"
    torch.save({"routers": {}, "step": 3} if case == "another file" else {"step": 3, "weights": torch.ones(64)}, state)
    if case != "another file":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2] if case == "truncated" else b"")
    line = _one_error(capsys, ["train-dyvte", "--no-progress", "--steps", "1", "--out", str(out)],
                      "vtprune train-dyvte")
    assert f"cannot resume from {state}" in line and "delete it" in line and "new --out" in line
    assert ("not a train-dyvte state" in line) == (case == "another file")


CALIBRATE_ERRORS = {
    "prompts 0": ({"--prompts": "0"}, "--prompts 0: must be >= 1"),
    "tau nan": ({"--tau": "nan"}, "--tau nan: must be a finite number > 0"),
    "tau inf": ({"--tau": "inf"}, "--tau inf: must be a finite number > 0"),
    "out not yaml": ({"--out": "{dir}/sinks.txt"}, ".yaml config"),
    "out under a file": ({"--out": "{text}/sinks.yaml"}, "--out {text}/sinks.yaml: {text} is a file"),
    "out is a folder": ({"--out": "{dir}/folder.yaml"}, "is a folder; give a file name"),
    "missing data": ({"--data": "{dir}/nope"}, "not a folder"),
    "missing model": ({"--model": "{dir}/no-model"}, "no such folder"),
}


@pytest.mark.parametrize("case", list(CALIBRATE_ERRORS))
def test_calibrate_sinks_user_errors(files, capsys, case):
    over, expected = CALIBRATE_ERRORS[case]
    (files["dir"] / "folder.yaml").mkdir()
    fmt = {k: str(v) for k, v in files.items()}
    argv = [x.format(**fmt) for x in _flags({"--prompts": "1", **over})]
    assert expected.format(**fmt) in _one_error(capsys, ["calibrate-sinks", *argv], "vtprune calibrate-sinks")


@pytest.mark.parametrize("existing", [False, True])
def test_calibrate_sinks_with_no_sink_found_writes_nothing(files, capsys, tiny_model, existing):
    """|x_d| / RMS(x) <= sqrt(d) for every dimension, so a --tau above sqrt(d) finds no sink: VAR could not run
    with such a config, so none is written (an existing file stays as it was), one stderr line says why, exit 1."""
    model, forwards = tiny_model
    tau = model.config.text_config.hidden_size ** 0.5 + 1
    out = files["dir"] / "var.yaml"
    if existing:
        out.write_text("method: var\nsink_dims: [3]\n")
    status = top_cli.main(["calibrate-sinks", "--prompts", "1", "--tau", str(tau), "--out", str(out)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 1 and forwards  # the prompt ran: this is a finding, not a usage error
    assert len(lines) == 1 and lines[0].startswith("vtprune calibrate-sinks: no sink dimension found"), lines
    assert f"nothing written to {out}" in lines[0] and "--tau" in lines[0]
    assert (out.read_text() == "method: var\nsink_dims: [3]\n") if existing else not out.exists()


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("entry", ["vtprune bench", "vtprune-bench"])
def test_bench_ctrl_c_is_one_line_and_exit_130(files, capsys, monkeypatch, tiny_model, entry):
    """Ctrl-C while the bench runs (here: during the vanilla answers): one line, exit status 130, nothing written."""
    from vtprune.benchmarks import cli as bench_cli

    monkeypatch.setattr(runner, "load_task", REAL_LOAD_TASK)
    monkeypatch.setattr(runner, "answer_task", _interrupt)
    argv = ["--no-progress", "--task", "gqa", "--limit", "2", "--methods", "random", "--keep", "8",
            "--out", str(files["dir"] / "bench")]
    try:
        status = top_cli.main(["bench", *argv]) if entry == "vtprune bench" else bench_cli.main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped as a traceback")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 130 and len(lines) == 1 and lines[0].startswith(f"{entry}: interrupted"), lines
    assert not (files["dir"] / "bench" / "results.json").exists()


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(files, capsys, monkeypatch, tiny_model):
    from vtprune import viz

    monkeypatch.setattr(viz, "kept_token_pictures", _interrupt)
    try:
        status = top_cli.main(_viz(files))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped as a traceback")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 130 and lines == ["vtprune viz: interrupted"]


def _broken_data(root: Path, case: str) -> tuple[Path, str]:
    """A malformed synthetic folder and what the one-line error must name: a GQA question id given twice, a
    truncated GQA image, an MME image given as both .png and .jpg."""
    import json

    from vtprune.embedded import synthetic

    if case == "mme png + jpg":
        folder = synthetic.write_mme(root / "mme", per_subtask=2)
        png = sorted(folder.glob("*/*.png"))[0]
        (png.with_suffix(".jpg")).write_bytes(png.read_bytes())
        return folder, f"{png.with_suffix('')}: 2 image files match"
    folder = synthetic.write_gqa(root / "gqa", n_questions=4)
    qfile = folder / "testdev_balanced_questions.json"
    data = json.loads(qfile.read_text())
    qid = sorted(data)[1]
    if case == "gqa id twice":
        pairs = [*data.items(), (qid, data[qid])]
        qfile.write_text("{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}")
        return folder, f"{qfile}: question id {qid!r} is given twice"
    image = folder / "images" / f"{data[qid]['imageId']}.png"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    return folder, f"{image}: not an image PIL can decode"


DATA_CASES = ["gqa id twice", "gqa truncated image", "mme png + jpg"]


@pytest.mark.parametrize("case", DATA_CASES)
@pytest.mark.parametrize("command", ["search", "train-dyvte", "calibrate-sinks"])
def test_malformed_data_folder_is_one_line_in_every_command(files, capsys, monkeypatch, command, case):
    """search, train-dyvte and calibrate-sinks read --data as bench does: a malformed folder or image is one line
    naming the file (and the GQA folder is never re-read as MME), exit 2, before any model loads."""
    from vtprune.benchmarks import runner as bench_runner

    monkeypatch.setattr(bench_runner, "load_model", loading.load_model)  # search's loader: fails too
    folder, expected = _broken_data(files["dir"], case)
    out = str(files["dir"] / "out")
    argv = {"search": ["search", "--method", "fastv", "--keep", "16", "--trials", "1", "--calib", "2",
                       "--task", case.split()[0], "--data", f"{case.split()[0]}={folder}", "--out", out],
            "train-dyvte": ["train-dyvte", "--no-progress", "--steps", "1", "--data", str(folder), "--out", out],
            "calibrate-sinks": ["calibrate-sinks", "--prompts", "1", "--data", str(folder)]}[command]
    line = _one_error(capsys, argv, f"vtprune {command}")
    assert f"--data {folder}: {expected}" in line
