"""Every shipped config loads into its method with valid hyperparameters, and prune(config=...) installs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import vtprune
from vtprune.registry import make_method

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "vtprune" / "configs").glob("*/*.yaml"))


def test_every_method_has_the_three_model_configs():
    methods = {p.parent.name for p in CONFIGS}
    assert {"flowcut", "vtc_cls", "fastv", "visionzip", "random"} <= methods
    for m in methods:
        assert {p.stem for p in CONFIGS if p.parent.name == m} == {"llava-1.5-7b", "llava-next-7b", "internvl"}


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
    try:
        assert model.vtprune.method.start_layer == 16 and model.vtprune.method.keep == 64
    finally:
        vtprune.unprune(model)
