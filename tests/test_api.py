"""Public API: prune / unprune / pruned, exact restore, and clear errors that leave the model usable."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import yaml

import vtprune
from vtprune import PruneError
from vtprune.budget import tokens_to_keep
from vtprune.errors import ConfigError
from vtprune.methods import FastV, RandomPrune

from .conftest import FAMILIES, collate, make_prompt


def hook_snapshot(model):
    """Every hook, attention override and attention-implementation choice on the model, comparable by ==."""
    return [
        (name, tuple(m._forward_hooks.values()), tuple(m._forward_pre_hooks.values()), "_vtprune_attention" in m.__dict__,
         getattr(getattr(m, "config", None), "_attn_implementation", None))
        for name, m in model.named_modules()
    ] + [("get_image_features" in model.model.__dict__, "_expand_inputs_for_generation" in model.__dict__)]


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["random", "fastv", "visionzip"])
def test_ratio_zero_and_unprune_are_bit_identical(models, family, method):
    model = models(family)
    batch = collate([make_prompt(model, family, 4, 0), make_prompt(model, family, 7, 1)])
    ref = _logits(model, batch)
    before = hook_snapshot(model)
    with vtprune.pruned(model, method, ratio=0.0):
        assert torch.equal(_logits(model, batch), ref)
        assert model.vtprune.stats.kept_tokens == model.vtprune.stats.visual_tokens
    vtprune.prune(model, method, ratio=0.5)
    pruned = _logits(model, batch)
    assert pruned.shape[1] < ref.shape[1]
    vtprune.unprune(model)
    assert not hasattr(model, "vtprune")
    assert torch.equal(_logits(model, batch), ref)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert hook_snapshot(model) == before


def test_text_only_passes_through(models):
    model = models("llava")
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        ref_gen = model.generate(input_ids=ids, max_new_tokens=5)
        with vtprune.pruned(model, "fastv", ratio=0.5):
            assert torch.equal(model(input_ids=ids).logits, ref)
            assert torch.equal(model.generate(input_ids=ids, max_new_tokens=5), ref_gen)


def test_list_methods_and_keyword_validation():
    methods = vtprune.list_methods()
    assert {"random", "fastv", "visionzip"} <= set(methods)
    assert all(isinstance(d, str) and d for d in methods.values())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="fastvv", ratio=0.5), "Did you mean 'fastv'"),
        (dict(method="visonzip", ratio=0.5), "Did you mean 'visionzip'"),
        (dict(method="fastv", ratio=1.0), "ratio must be a number in \\[0, 1\\)"),
        (dict(method="fastv", ratio=-0.1), "ratio must be"),
        (dict(method="fastv", keep=0), "keep must be a positive integer"),
        (dict(method="fastv", keep=65), "more than the 64 visual tokens"),
        (dict(method="fastv", ratio=0.5, keep=3), "exactly one budget"),
        (dict(method="fastv"), "exactly one budget"),
        (dict(method="fastv", ratio=0.5, layr=3), "unknown keyword.*valid keywords"),
        (dict(method="fastv", ratio=0.5, layer=9), "layers 0..3"),
        (dict(method="random", ratio=0.5, positions="shifted"), "positions must be one of"),
        (dict(method="random", ratio=0.5, seed="abc"), "random seed='abc' has the wrong type: expected int"),
        (dict(method="fastv", ratio=0.5, layer="2"), "fastv layer='2' has the wrong type: expected int"),
        (dict(method="fastv", ratio=0.5, layer=0), "fastv layer=0 is out of range"),
        (dict(method="flowcut", ratio=0.5, vit_share=0.0), "flowcut vit_share=0.0 is out of range"),
        (dict(method="flowcut", ratio=0.5, vit_share=1.5), "flowcut vit_share=1.5 is out of range"),
        (dict(method="vtc_cls", ratio=0.5, start_layer=5), "start_layer=5 is past the feature layer 1"),
    ],
)
def test_bad_arguments_raise_and_leave_model_untouched(models, kwargs, match):
    model = models("llava")
    batch = collate([make_prompt(model, "llava", 4, 0)])
    ref = _logits(model, batch)
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=match):  # unknown keywords too (a TypeError before)
        vtprune.prune(model, method, **kwargs)
    assert not hasattr(model, "vtprune")
    assert torch.equal(_logits(model, batch), ref)


TOO_MANY = "keep={} is more than the 64 visual tokens an image has for this model; use keep <= 64 (or ratio=...)"


@pytest.mark.parametrize("pipeline, message", [
    (lambda: FastV(keep=65), re.escape(f"vtprune: fastv {TOO_MANY.format(65)}") + "$"),
    (lambda: [RandomPrune(keep=32), FastV(keep=65)],
     re.escape(f"vtprune: fastv {TOO_MANY.format(65)} (pipeline entry 2 of 2)")),
    (lambda: [RandomPrune(keep=99), RandomPrune(keep=8), FastV(ratio=0.5)],
     re.escape(f"vtprune: random {TOO_MANY.format(99)} (pipeline entry 1 of 3)")),
    (lambda: [RandomPrune(keep=8), "fastv"], r"fastv give exactly one budget: .* \(pipeline entry 'fastv' \(2 of 2\)"),
])
def test_budget_errors_name_the_method_and_its_pipeline_entry(models, pipeline, message):
    """A keep larger than the image names the method and, in a pipeline, which entry (two entries of one method
    are told apart); the model is untouched."""
    model = models("llava")
    before = hook_snapshot(model)
    with pytest.raises(ConfigError, match=message):
        vtprune.prune(model, pipeline())
    assert not hasattr(model, "vtprune") and hook_snapshot(model) == before
    with pytest.raises(ConfigError, match=re.escape(f"vtprune: visionzip {TOO_MANY.format(65)}")):
        tokens_to_keep(64, None, 65, 64, "visionzip")  # the shared helper names the method too


def test_numpy_budget_and_hyperparameters_are_accepted(models):
    model = models("llava")
    with vtprune.pruned(model, "fastv", keep=np.int64(8), layer=np.int64(2)):
        assert type(model.vtprune.method.keep) is int and model.vtprune.method.keep == 8
        model(**collate([make_prompt(model, "llava", 4, 0)]))
        assert model.vtprune.stats.kept_tokens == 8


def test_unsupported_model_names_supported_classes():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(TypeError, match="unsupported model LlamaForCausalLM.*LlavaForConditionalGeneration"):
        vtprune.prune(model, "fastv", ratio=0.5)


def test_pruning_twice_raises_and_keeps_first_method(models):
    model = models("llava")
    vtprune.prune(model, "random", ratio=0.5)
    try:
        with pytest.raises(PruneError, match="already pruned with 'random'.*unprune"):
            vtprune.prune(model, "fastv", ratio=0.5)
        assert model.vtprune.method.name == "random"
    finally:
        vtprune.unprune(model)


def test_image_token_count_mismatch_is_clear_and_restores(models):
    model = models("llava")
    good = collate([make_prompt(model, "llava", 4, 0)])
    ref = _logits(model, good)
    bad = dict(good)
    ids = good["input_ids"].clone()
    first = int(torch.nonzero(ids[0] == model.config.image_token_id)[0])
    ids[0, first] = 5  # one image token missing
    bad["input_ids"] = ids
    vtprune.prune(model, "random", ratio=0.5)
    with pytest.raises(PruneError, match="image-token count mismatch"):
        _logits(model, bad)
    assert not hasattr(model, "vtprune")
    assert torch.equal(_logits(model, good), ref)


def test_exception_inside_a_hook_leaves_no_hooks_or_state(models, monkeypatch):
    model = models("internvl")
    batch = collate([make_prompt(model, "internvl", 4, 0)])
    ref = _logits(model, batch)
    before = hook_snapshot(model)
    vtprune.prune(model, "fastv", ratio=0.5)

    def boom(self, image):
        raise RuntimeError("scoring exploded")

    monkeypatch.setattr(type(model.vtprune.method), "score", boom)
    with pytest.raises(PruneError, match="scoring exploded.*unpruned now"):
        _logits(model, batch)
    monkeypatch.undo()
    assert not hasattr(model, "vtprune")
    assert hook_snapshot(model) == before
    assert torch.equal(_logits(model, batch), ref)


def test_pruned_context_manager_restores_on_error(models):
    model = models("llava")
    with pytest.raises(KeyError):
        with vtprune.pruned(model, "random", ratio=0.5):
            assert hasattr(model, "vtprune")
            raise KeyError("user code failed")
    assert not hasattr(model, "vtprune")


def test_unprune_of_unpruned_model_warns(models):
    with pytest.warns(UserWarning, match="not pruned"):
        vtprune.unprune(models("llava"))


def test_config_file(models, tmp_path):
    model = models("llava")
    path = tmp_path / "fastv.yaml"
    path.write_text(yaml.safe_dump({"method": "fastv", "layer": 3, "keep": 16}))
    vtprune.prune(model, config=path)
    try:
        assert model.vtprune.method.layer == 3 and model.vtprune.method.keep == 16
    finally:
        vtprune.unprune(model)
