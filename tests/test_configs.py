"""Every shipped config loads into its method with valid hyperparameters, and prune(config=...) installs it:
by path or shipped name, with errors that name the file (and line) and a warning for another model family."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import yaml

import vtprune
from vtprune.api import list_configs, load_config
from vtprune.errors import ConfigError
from vtprune.registry import make_method

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "vtprune" / "configs").glob("*/*.yaml"))


def test_every_method_has_the_three_model_configs():
    methods = {p.parent.name for p in CONFIGS}
    assert {"flowcut", "vtc_cls", "fastv", "visionzip", "random"} <= methods
    for m in methods:  # tuned configs of the embedded model (vtprune search) sit beside the paper defaults
        stems = {p.stem for p in CONFIGS if p.parent.name == m and not p.stem.startswith("tiny-llava-")}
        assert stems == {"llava-1.5-7b", "llava-next-7b", "internvl"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_is_valid(path):
    data = yaml.safe_load(path.read_text())
    assert data["method"] == path.parent.name
    data.pop("model")
    make_method(data.pop("method"), **data)


def test_prune_with_config_file(models):
    model = models("llava")
    path = next(p for p in CONFIGS if p.parent.name == "vtc_cls" and p.stem == "llava-1.5-7b")
    # the 7B budget (keep 64) is exactly the tiny test model's 64 tokens: valid, keeps everything
    vtprune.prune(model, config=path)
    try:  # start_layer null: 16 on the 7B's 24-layer CLIP-L, the same depth (capped at the feature layer) here
        assert model.vtprune.method.start_layer is None and model.vtprune.method.keep == 64
        assert model.vtprune.method.layers(24, 22) == range(16, 23)
    finally:
        vtprune.unprune(model)


def test_list_configs_names_every_shipped_file():
    assert list_configs() == [f"{p.parent.name}/{p.stem}" for p in CONFIGS]
    assert list_configs("flowcut") == ["flowcut/internvl", "flowcut/llava-1.5-7b", "flowcut/llava-next-7b",
                                       "flowcut/tiny-llava-keep16", "flowcut/tiny-llava-keep32"]


@pytest.mark.parametrize("name", ["random/llava-1.5-7b", "random/llava-1.5-7b.yaml"])
def test_shipped_name_resolves_to_the_packaged_file(models, name):
    model = models("llava")
    assert load_config(name) == yaml.safe_load((CONFIGS[0].parents[1] / "random" / "llava-1.5-7b.yaml").read_text())
    with vtprune.pruned(model, config=name):
        assert model.vtprune.method.name == "random" and model.vtprune.method.keep == 64


def test_unknown_shipped_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="'flowcut/llava-2' is neither a file nor a shipped config; shipped: .*"
                                         "flowcut/llava-1.5-7b"):
        load_config("flowcut/llava-2")
    with pytest.raises(FileNotFoundError):
        load_config("/no/such/dir/x.yaml")


def test_malformed_yaml_names_the_file_and_line(models, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: fastv\nlayer: 2\nratio: [0.5\n")
    with pytest.raises(ValueError, match=re.escape(f"config {path} is not valid YAML at line 4")):
        load_config(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        vtprune.prune(models("llava"), config=path)
    path.write_text("- method\n- fastv\n")
    with pytest.raises(ValueError, match=re.escape(f"config {path} must be a mapping")):
        load_config(path)


def test_unknown_keyword_in_a_config_is_a_value_error_naming_file_line_and_fields(models, tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("method: fastv\nratio: 0.5\nlayr: 3\n")
    match = rf"unknown keyword\(s\) layr.*valid keywords: keep, layer, positions, ratio \(config {re.escape(str(path))} line 3"
    with pytest.raises(ValueError, match=match):
        load_config(path)  # before any model is loaded
    model = models("llava")
    with pytest.raises(ValueError, match=match):
        vtprune.prune(model, config=path)
    assert not hasattr(model, "vtprune")
    path.write_text("method: fastvv\nratio: 0.5\n")
    with pytest.raises(ValueError, match=rf"Did you mean 'fastv'.*\(config {re.escape(str(path))} line 1\)"):
        load_config(path)


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("method: fastv\nkeep: 8\nratio: 0.5\nkeep: 9\n")
    with pytest.raises(ConfigError, match=re.escape(f"config {path} is not valid YAML at line 4") +
                       r".*'keep' is given twice \(first at line 2\)"):
        load_config(path)


@pytest.mark.parametrize("text, line", [
    ("pipeline:\n  - method: visionzip\n    keep: 16\n  - method: fastv\n    ratio: 0.5\n    layr: 2\n", 6),
    ("- method: visionzip\n  keep: 16\n- method: fastv\n  layr: 2\n  ratio: 0.5\n", 4),
])
def test_unknown_keyword_in_a_pipeline_entry_names_its_line(tmp_path, text, line):
    path = tmp_path / "pipe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"layr.*\(config {re.escape(str(path))} line {line}\)"):
        load_config(path)


@pytest.mark.parametrize("text, key, line, entry", [
    ("pipeline:\n  - method: visionzip\n    keep: 16\n  - method: fastv\n    ratio: 0.5\n    evict_early_kv: true\n",
     "evict_early_kv", 6, 2),
    ("- method: fastv\n  evict_early_kv: false\n  ratio: 0.5\n", "evict_early_kv", 2, 1),
    ("pipeline:\n  - {method: visionzip, keep: 16}\n  - {method: fastv, model: llava-hf/llava-1.5-7b-hf, ratio: 0.5}\n",
     "model", 3, 2),
])
def test_a_pipeline_level_key_inside_a_pipeline_entry_names_its_line(models, tmp_path, text, key, line, entry):
    """``evict_early_kv:`` (and ``model:``) apply to the whole pipeline: inside an entry they were silently ignored;
    now an error naming the line and where the key belongs, before a model is touched."""
    path = tmp_path / "pipe.yaml"
    path.write_text(text)
    match = (rf"config {re.escape(str(path))} line {line}: '{key}:' is set inside pipeline entry {entry} "
             r"\(\w+\), but it applies to the whole pipeline; write it once beside 'pipeline:'")
    with pytest.raises(ConfigError, match=match):
        load_config(path)
    model = models("llava")
    with pytest.raises(ConfigError, match=match):
        vtprune.prune(model, config=path)
    assert not hasattr(model, "vtprune")
    fixed = tmp_path / "fixed.yaml"  # the same option beside pipeline: is read
    fixed.write_text("evict_early_kv: true\npipeline:\n  - {method: fastv, ratio: 0.5}\n")
    assert load_config(fixed)["evict_early_kv"] is True


def test_a_layer_beyond_the_model_in_a_config_names_the_file(models, tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("method: fastv\nratio: 0.5\nlayer: 9\n")
    model = models("llava")  # 4 LLM layers: found at prune(), once the model is known
    with pytest.raises(ConfigError, match=rf"fastv layer=9\) \(config {re.escape(str(path))}\)"):
        vtprune.prune(model, config=path)
    assert not hasattr(model, "vtprune")


def test_a_bad_value_in_a_config_names_the_file(models, tmp_path):
    path = tmp_path / "fastv.yaml"
    path.write_text("method: fastv\nratio: 0.5\nlayer: '2'\n")
    with pytest.raises(ValueError, match=rf"fastv layer='2' has the wrong type.*\(config {re.escape(str(path))}\)"):
        vtprune.prune(models("llava"), config=path)


def test_a_config_for_another_model_family_warns_naming_both(models):
    model = models("llava")
    with pytest.warns(UserWarning, match=r"is for 'OpenGVLab/InternVL3-8B-hf' \(internvl family\) but the model being "
                                         r"pruned is a LlavaForConditionalGeneration \(llava family\).*"
                                         r"config='vtc_cls/llava-1.5-7b'"):
        vtprune.prune(model, config="vtc_cls/internvl")
    vtprune.unprune(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with vtprune.pruned(model, config="vtc_cls/llava-1.5-7b"):
            pass


@pytest.mark.parametrize("name, family", [("llava-hf/llava-1.5-7b-hf", "llava"), ("liuhaotian/llava-v1.5-13b", "llava"),
                                          ("llava-hf/llava-v1.6-vicuna-7b-hf", "llava_next"),
                                          ("llava-hf/llama3-llava-next-8b-hf", "llava_next"),
                                          ("OpenGVLab/InternVL3-8B-hf", "internvl"), ("./my-model", None)])
def test_model_family_from_the_config_model_name(name, family):
    from vtprune.api import _model_family

    assert _model_family(name) == family


@pytest.mark.parametrize("text, message", [
    ("pipeline:\n  - method: random\n    keep: 32\n  - method: random\n    keep: 99\n",
     "random keep=99 is more than the 64 visual tokens.*\\(config {path} line 5, pipeline entry 2 of 2\\)$"),
    ("- {method: random, keep: 0}\n- {method: fastv, ratio: 0.5}\n",
     "random keep must be a positive integer.*\\(config {path} line 1, pipeline entry 1 of 2\\)$"),
    ("model: llava-hf/llava-1.5-7b-hf\nmethod: random\nkeep: 99\n",
     "random keep=99 is more than the 64 visual tokens.*\\(config {path} line 3\\)$"),
], ids=["second-of-two-randoms", "bad-keep-in-a-list", "one-method"])
def test_a_budget_error_in_a_config_names_the_method_its_entry_and_line(models, tmp_path, text, message):
    """Two entries of one method are told apart by their entry and line."""
    path = tmp_path / "budget.yaml"
    path.write_text(text)
    model = models("llava")
    with pytest.raises(ConfigError, match=message.format(path=re.escape(str(path)))):
        vtprune.prune(model, config=path)
    assert not hasattr(model, "vtprune")


def test_a_config_budget_the_model_cannot_satisfy_errors(models, tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("method: random\nmodel: llava-hf/llava-1.5-7b-hf\nkeep: 128\n")
    model = models("llava")
    with pytest.raises(ConfigError, match=r"keep=128 is more than the 64 visual tokens.*use keep <= 64"):
        vtprune.prune(model, config=path)
    assert not hasattr(model, "vtprune")
