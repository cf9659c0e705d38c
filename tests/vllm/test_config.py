"""The vLLM plugin's checks, before any engine (these run in the main environment: no vLLM needed): what is
served, and one clear error for what is not (spec serving_eval.md §1.3, §1.5)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import vtprune
from vtprune.errors import ConfigError
from vtprune.vllm.config import ARCH, model_info, plan, read_config

TINY = str(Path(vtprune.__file__).parent / "assets" / "tiny-llava")


def test_plan_selects_the_architecture_and_carries_the_method():
    assert plan(TINY, "visionzip", {"keep": 36}) == {"architectures": [ARCH],
                                                     "vtprune": {"method": "visionzip", "keep": 36}}


def test_model_info_reads_the_tiny_llava_shape():
    config = json.loads((Path(TINY) / "config.json").read_text())
    vision = config["vision_config"]
    info = model_info(config)
    assert info.nominal_tokens == (vision["image_size"] // vision["patch_size"]) ** 2 == 144
    # vision_feature_layer -2 of a 4-layer tower: the output of layer index 2 is read
    assert info.feature_layer == vision["num_hidden_layers"] - 2
    assert info.vision_layers == vision["num_hidden_layers"]


@pytest.mark.parametrize("method, fields, words", [
    ("visionzp", {"keep": 8}, ["unknown method", "visionzip"]),
    ("fastv", {"ratio": 0.5}, ["fastv", "inside the LLM", "random, visionzip, vtc_cls, divprune"]),
    ("var", {}, ["var", "modulates attention"]),
    ("flowcut", {"ratio": 0.5}, ["flowcut", "inside the vision tower"]),
    ("vflowopt", {"ratio": 0.5}, ["vflowopt", "inside the LLM"]),
    ("cdpruner", {"keep": 8}, ["cdpruner", "prompt's instruction"]),
    ("visionzip", {"keep": 145}, ["keep=145", "144"]),
    ("vtc_cls", {"keep": 8, "start_layer": 3}, ["start_layer=3", "feature layer 2"]),
    ("random", {"keep": 8, "layer": 3}, ["unknown keyword", "layer"]),
])
def test_bad_method_or_budget_is_one_clear_error(method, fields, words):
    with pytest.raises(ConfigError) as err:
        plan(TINY, method, fields)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_unsupported_model_is_refused_naming_what_works(tmp_path):
    config = json.loads((Path(TINY) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llava_next"}))
    with pytest.raises(ConfigError, match="serves LLaVA-1.5.*'llava_next'"):
        plan(str(tmp_path), "random", {"keep": 8})
    with pytest.raises(ConfigError, match="cannot read the config"):
        read_config(str(tmp_path / "missing"))


@pytest.mark.parametrize("argv, words", [
    (["--method", "fastv", "--keep", "8"], ["inside the LLM"]),
    (["--method", "visionzip", "--keep", "500"], ["keep=500"]),
    (["--method", "visionzip", "--keep", "8", "--hf-overrides", "{}"], ["--hf-overrides is set by vtprune serve"]),
    (["--method", "random", "--keep", "8", "--set", "keep=3"], ["--keep"]),
])
def test_serve_usage_errors_are_one_line_before_the_engine(argv, words):
    done = subprocess.run([sys.executable, "-m", "vtprune.cli", "serve", TINY, *argv], capture_output=True,
                          text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("vtprune serve: error:"), done.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_none_is_the_unpruned_baseline_and_takes_no_budget():
    assert plan(TINY, "none")["vtprune"] == {"method": None}
    with pytest.raises(ConfigError, match="every visual token; drop keep"):
        plan(TINY, "none", {"keep": 36})


@pytest.mark.parametrize("kwargs, words", [
    (dict(method="fastv", ratio=0.5), "inside the LLM"),
    (dict(method="visionzip", keep=200), "keep=200"),
    (dict(method="visionzip", keep=36, hf_overrides={}), "sets hf_overrides itself"),
])
def test_python_route_errors_before_any_engine(kwargs, words):
    """vtprune.vllm.LLM checks everything before importing vLLM (here vLLM may be absent altogether)."""
    import vtprune.vllm

    with pytest.raises(ConfigError, match=words):
        vtprune.vllm.LLM(TINY, **kwargs)


@pytest.mark.parametrize("argv, words", [
    (["--model", TINY, "--methods", "none,fastv"], ["inside the LLM"]),
    (["--model", TINY, "--methods", "visionzip", "--keep", "500"], ["keep=500"]),
    (["--arch", "llava-next-7b"], ["llava-1.5-7b", "llava-1.5-13b"]),
    (["--arch", "llava-1.5-7b", "--llm-layers", "99"], ["llm_layers", "1..32", "99"]),
    (["--model", TINY, "--llm-layers", "2"], ["need --arch"]),
])
def test_throughput_bench_usage_errors_are_one_line_before_any_engine(argv, words):
    done = subprocess.run([sys.executable, "-m", "vtprune.vllm.bench", *argv], capture_output=True, text=True,
                          timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[-1].startswith("python -m vtprune.vllm.bench: error:"), done.stderr
    assert len(lines) == 1 or lines[0].startswith("usage:"), done.stderr
    assert all(w in lines[-1] for w in words), lines[-1]
