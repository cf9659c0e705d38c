"""`vtprune bench --config` / `--set`, the shared --set parser, and subclasses of the supported model classes."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml

import vtprune
from vtprune import cli as top_cli
from vtprune.adapters import get_adapter
from vtprune.benchmarks import runner, synthetic

from ..conftest import FAMILIES, build_model, collate, make_prompt

FAST = ["--max-new-tokens", "1", "--timing-samples", "1", "--timing-repeats", "1", "--decode-tokens", "0",
        "--threads", "1", "--no-progress"]


def test_bench_config_files_and_set(tiny, tmp_path):
    gqa = synthetic.write_gqa(tmp_path / "gqa", n_questions=2)
    (tmp_path / "my_fastv.yaml").write_text(yaml.safe_dump({"method": "fastv", "layer": 1, "ratio": 0.5}))
    (tmp_path / "nobudget.yaml").write_text(yaml.safe_dump({"method": "random", "seed": 5}))
    out = tmp_path / "out"
    status = top_cli.main(["bench", "--model", str(tiny[0]), "--data", str(gqa), "--methods", "random", "--keep", "16",
                           "--config", str(tmp_path / "my_fastv.yaml"), "--config", "random/llava-1.5-7b",
                           "--config", str(tmp_path / "nobudget.yaml"), "--set", "positions=renumber",
                           "--out", str(out), *FAST])
    assert status == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    by_label = {r["label"]: r for r in runs}
    assert list(by_label) == ["vanilla", "random@keep16,positions=renumber",
                              "fastv@ratio0.5,positions=renumber[my_fastv]",
                              "random@keep64,positions=renumber[llava-1.5-7b]",
                              "random@keep16,positions=renumber[nobudget]"]
    fastv = by_label["fastv@ratio0.5,positions=renumber[my_fastv]"]
    assert fastv["config"] == "my_fastv" and fastv["kept_tokens"] == 72
    assert fastv["hyper"] == {"layer": 1, "positions": "renumber"}  # the file's field, --set over the default
    shipped = by_label["random@keep64,positions=renumber[llava-1.5-7b]"]
    assert shipped["kept_tokens"] == 64 and shipped["hyper"]["seed"] == 0
    swept = by_label["random@keep16,positions=renumber[nobudget]"]
    assert swept["kept_tokens"] == 16 and swept["hyper"]["seed"] == 5  # the file's seed beats --seed
    assert by_label["random@keep16,positions=renumber"]["config"] is None


def test_bench_runs_a_pipeline_config_as_the_file_says(tiny, tmp_path, capsys):
    gqa = synthetic.write_gqa(tmp_path / "gqa", n_questions=2)
    pipe = tmp_path / "zip_then_fastv.yaml"
    pipe.write_text("- {method: visionzip, keep: 48}\n- {method: fastv, ratio: 0.5, layer: 1}\n")
    out = tmp_path / "out"
    assert top_cli.main(["bench", "--model", str(tiny[0]), "--data", str(gqa), "--config", str(pipe),
                         "--out", str(out), *FAST]) == 0
    run = json.loads((out / "results.json").read_text())["runs"][1]
    assert run["label"] == "visionzip+fastv[zip_then_fastv]" and run["kept_tokens"] == 24
    assert run["hyper"] == {"pipeline": [{"method": "visionzip", "keep": 48},
                                         {"method": "fastv", "layer": 1, "ratio": 0.5}]}
    assert run["scores"]["gqa"]["accuracy"] is not None
    capsys.readouterr()
    assert top_cli.main(["bench", "--model", str(tiny[0]), "--config", str(pipe), "--set", "seed=1",
                         "--out", str(tmp_path / "o2"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--set does not apply to the pipeline config zip_then_fastv" in err[0]


def test_set_overrides_a_config_field_and_seed_defaults():
    files = [("cfg", "random", {"keep": 8, "positions": "original"})]
    configs = runner.build_configs([], keeps=[4], seed=3, hyper={"random": {"positions": "renumber"}}, files=files)
    assert [c.label for c in configs] == ["vanilla", "random@keep8,positions=renumber[cfg]"]
    assert configs[1].prune_kwargs() == {"keep": 8, "positions": "renumber", "seed": 3}


def test_bench_config_keep_above_the_models_tokens(tiny, tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text("method: random\nkeep: 500\n")
    assert top_cli.main(["bench", "--model", str(tiny[0]), "--config", str(big), "--out", str(tmp_path / "o"),
                         *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vtprune bench: error: --config big: keep 500 exceeds the 144") and "\n" not in err


def test_parse_set_is_shared_and_reads_yaml_values():
    assert top_cli.parse_set(["a=1", "b=0.5", "c=1e-3", "d=true", "e=renumber", "f=[1, 2]"]) == {
        "a": 1, "b": 0.5, "c": 0.001, "d": True, "e": "renumber", "f": [1, 2]}
    for bad in ("layer", "=3", " =3"):
        with pytest.raises(top_cli.UsageError, match="KEY=VALUE"):
            top_cli.parse_set([bad])
    with pytest.raises(top_cli.UsageError, match="--ratio"):
        top_cli.parse_set(["ratio=0.5"])


def test_bench_help_documents_config_set_and_fastv_without_cache(capsys):
    with pytest.raises(SystemExit):
        top_cli.main(["bench", "-h"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--config" in text and "--set" in text
    assert "use_cache=False" in text and "FastV re-chooses its kept set at each step" in text


@pytest.mark.parametrize("family", FAMILIES)
def test_a_subclass_of_a_supported_class_is_pruned(family):
    base = build_model(family)
    model = build_model(family)
    model.__class__ = type(f"My{type(model).__name__}", (type(model),), {})  # a trivial user subclass
    assert get_adapter(model).family == get_adapter(base).family
    batch = collate([make_prompt(model, family, 4, 0)])
    with vtprune.pruned(model, "random", ratio=0.5, seed=0), torch.no_grad():
        model(**batch)
        stats = model.vtprune.stats
        assert 0 < stats.kept_tokens < stats.visual_tokens
    assert not hasattr(model, "vtprune")


def test_a_lookalike_class_name_outside_transformers_is_not_supported():
    class LlavaForConditionalGeneration(torch.nn.Module):  # same name, not the transformers class
        pass

    with pytest.raises(TypeError, match="unsupported model LlavaForConditionalGeneration"):
        get_adapter(LlavaForConditionalGeneration())
