"""kvpress-style matrix: every registered method x model family x batch size, and every method composed with an
in-LLM pruner and wrapped by a test-only modulator.

A left-padded batch of prompts of different lengths (and, for LLaVA-NeXT, different image sizes and so
different visual-token counts) must give the same greedy tokens as each prompt alone; the kept sets must
respect the budget, be sorted and be deterministic. A method is in the matrix by being registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtprune
from vtprune.budget import tokens_to_keep
from vtprune.methods import FastV
from vtprune.methods.base import Method
from vtprune.registry import make_method, method_class, register

from .conftest import FAMILIES, QWEN_FAMILIES, collate, make_prompt

DEFAULT = dict(ratio=0.6)
SETTINGS = {  # where a method needs other test settings than DEFAULT (tiny towers, batch-independent schedules)
    "visionzip": dict(keep=12),
    "vtc_cls": dict(ratio=0.6, start_layer=0),
    "flowcut": dict(ratio=0.75, shared_prune_count=False),
    "cdpruner": dict(ratio=0.6, relevance="llm", anyres="global"),  # no CLIP checkpoint offline; per-crop NeXT budget
    "sparsevlm": dict(ratio=0.6, convention="input"),  # the matrix checks the layer-input average
}
METHODS = {name: SETTINGS.get(name, DEFAULT if method_class(name).has_budget else {})
           for name in vtprune.list_methods() if not name.startswith("_") and method_class(name).prunes}
LEARNED = {"dyvte": lambda routers, family: dict(routers=routers(family))}  # methods that need trained weights
# refused on Qwen-VL at prune() (tested below; README table): they read or cut the vision tower's [crops, 1+n, D]
QWEN_REFUSED = {"flowcut": "cuts at vision layer", "paint": "reads VisionCLS", "vflowopt": "reads VisionAttentionMap"}
QWEN_SETTINGS = {"visionzip": dict(ratio=0.5), "vtc_cls": dict(ratio=0.6)}  # replace SETTINGS: 4..12-token images
ALL_FAMILIES = FAMILIES + QWEN_FAMILIES


def skip_refused(family, method, batch_size=3, wrapper="then_fastv", composed=False):
    """Qwen rows: refused methods have their own test; suite time: batch 3 only (each prompt also runs alone) and
    the in-LLM-pruner composition only (the modulator wrappers are family-independent)."""
    if family in QWEN_FAMILIES and method in QWEN_REFUSED:
        pytest.skip(f"{method} is refused on Qwen-VL (test_every_method_runs_on_qwen_or_is_refused_at_prune)")
    if family in QWEN_FAMILIES and (batch_size, wrapper) != (3, "then_fastv"):
        pytest.skip("Qwen rows: batch 3 with the FastV composition only (suite time)")
    if family in QWEN_FAMILIES and composed and family != "qwen3_vl":
        pytest.skip("Qwen compositions: on Qwen3-VL only (DeepStack; the other classes share its code paths)")


def settings(method, family, dyvte_routers) -> dict:
    """The matrix settings of ``method``, with weights for the tiny ``family`` model where it learns some."""
    base = QWEN_SETTINGS.get(method, METHODS[method]) if family in QWEN_FAMILIES else METHODS[method]
    return {**base, **(LEARNED[method](dyvte_routers, family) if method in LEARNED else {})}
BUDGET_KEYS = ("ratio", "keep")
STEPS = 8


def _next_crops(model, size) -> int:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return int(image_size_to_num_patches(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size))


def _generate(model, prompts):
    with torch.no_grad():
        out = model.generate(**collate(prompts), max_new_tokens=STEPS, do_sample=False)
    return out[:, -STEPS:].tolist()


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("batch_size", [1, 3])
def test_batch_equals_single_and_budget(models, dyvte_routers, family, method, batch_size):
    skip_refused(family, method, batch_size=batch_size)
    model = models(family)
    conf = QWEN_SETTINGS.get(method, METHODS[method]) if family in QWEN_FAMILIES else METHODS[method]
    prompts = [make_prompt(model, family, text_len=3 + 4 * i, seed=i) for i in range(batch_size)]
    with vtprune.pruned(model, method, **settings(method, family, dyvte_routers)):
        batched = _generate(model, prompts)
        stats = model.vtprune.stats
        nominal = model.vtprune.adapter.image_nominal  # None on Qwen: keep is per image
        assert len(stats.images) == batch_size
        for img in stats.images:
            expected = (tokens_to_keep(img.n_tokens, conf.get("ratio"), conf.get("keep"), nominal)
                        if conf and method_class(method).has_budget else None)
            if method == "visionzip" and family == "llava_next":  # the official budget is per crop
                crops = _next_crops(model, prompts[img.sample].image_sizes[0])
                per_crop = tokens_to_keep(nominal, conf.get("ratio"), conf.get("keep"), nominal)
                expected = min(img.n_tokens, crops * per_crop)
            if not method_class(method).has_budget:  # schedule-defined or learned: no budget to meet
                assert img.kept <= img.n_tokens
            elif method_class(method).budget_kind == "average":  # visual tokens averaged over the LLM layers
                target = img.n_tokens * (1 - conf["ratio"]) if "ratio" in conf else expected
                assert abs(img.equivalent_tokens - target) <= 1
            elif method == "flowcut" and family == "llava_next":
                assert img.kept <= expected  # the ViT stage may already leave fewer than the budget
            else:
                assert img.kept == expected
            idx = img.kept_index
            assert idx == sorted(set(idx)) and all(0 <= i < img.n_tokens for i in idx)
            assert img.equivalent_tokens <= img.n_tokens
        kept_batch = [img.kept_index for img in stats.images]
        singles, kept_single = [], []
        for p in prompts:
            singles.append(_generate(model, [p])[0])
            kept_single.append(model.vtprune.stats.images[0].kept_index)
    assert batched == singles
    assert kept_batch == kept_single


@pytest.mark.parametrize("family", FAMILIES)
def test_same_inputs_and_seed_same_kept_tokens(models, family):
    model = models(family)
    batch = collate([make_prompt(model, family, 5, 0)])
    kept = []
    for seed in (0, 0, 1):
        with vtprune.pruned(model, "random", ratio=0.5, seed=seed), torch.no_grad():
            model(**batch)
            kept.append(model.vtprune.stats.images[0].kept_index)
    assert kept[0] == kept[1]
    assert kept[0] != kept[2]


def test_two_images_in_one_sample(models):
    model = models("llava")
    prompt = make_prompt(model, "llava", 4, 0, n_images=2)
    with vtprune.pruned(model, "fastv", keep=16), torch.no_grad():
        out = model(**collate([prompt]))
        stats = model.vtprune.stats
    assert [i.kept for i in stats.images] == [16, 16]
    assert out.logits.shape[1] == prompt.input_ids.numel() - 2 * (64 - 16)


@register
@dataclass
class _DampVisual(Method):
    """Test-only modulator (the wrapper of the composition axis): adds log(alpha) to every LLM layer's logits of
    the keys that hold visual tokens in that layer's layout."""

    alpha: float = 0.5

    name: ClassVar[str] = "_test_damp_visual"
    description: ClassVar[str] = "test wrapper modulator"
    has_budget: ClassVar[bool] = False
    prunes: ClassVar[bool] = False

    def cuts(self, model):
        return ()

    def modulated_layers(self, model):
        return tuple(range(1, model.llm_layers))

    def modulate(self, call):
        bias = torch.where(call.visual, torch.tensor(self.alpha).log(), torch.tensor(0.0))
        return call.run(bias=bias[:, None, None, :])


WRAPPERS = {
    "then_fastv": lambda: FastV(ratio=0.5, layer=3),  # an in-LLM pruner after it
    "damped": lambda: _DampVisual(alpha=0.5),  # a modulator over it
    "identity_modulator": lambda: _DampVisual(alpha=1.0),
}


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_pipelines_batch_equals_single(models, dyvte_routers, family, method, wrapper):
    skip_refused(family, method, wrapper=wrapper, composed=True)
    model = models(family)
    prompts = [make_prompt(model, family, text_len=3 + 4 * i, seed=i) for i in range(3)]
    kwargs = settings(method, family, dyvte_routers)
    if wrapper == "then_fastv" and any(c.where == "llm" and c.layer > 3 for c in make_method(method, **kwargs).cuts(
            vtprune.core.plan.model_info(vtprune.adapters.get_adapter(model)))):
        pytest.skip(f"{method} cuts after FastV's layer 3")

    def pipeline():
        return [make_method(method, **kwargs), WRAPPERS[wrapper]()]

    with vtprune.pruned(model, pipeline()):
        batched = _generate(model, prompts)
        stats = model.vtprune.stats
        kept_batch = [img.kept_index for img in stats.images]
        singles, kept_single = [], []
        for p in prompts:
            singles.append(_generate(model, [p])[0])
            kept_single.append(model.vtprune.stats.images[0].kept_index)
    assert batched == singles and kept_batch == kept_single
    quiet = not method_class(method).records_unchanged  # no stage where it kept an image whole (DyVTE)
    for img in stats.images:
        names = [st.method for st in img.stages]
        if wrapper == "then_fastv" and "fastv" in names:  # FastV's ratio is relative to what the first one left
            last = img.stages[-1]
            assert names[-1] == "fastv" and set(names[:-1]) == ({method} & set(names[:-1]) if quiet else {method})
            assert (last.stage, last.layer) == ("llm", 3)
            assert last.tokens_in == (img.stages[-2].tokens_out if len(names) > 1 else img.n_tokens)
            assert last.tokens_out == tokens_to_keep(last.tokens_in, 0.5, None)
        elif wrapper == "then_fastv":  # the first method left this image no tokens for FastV
            assert names == [method] and img.kept == 0
        else:
            assert set(names) <= {method} if quiet else set(names) == {method}
    if wrapper == "identity_modulator":  # alpha = 1 adds a zero bias: the method alone decides every token
        with vtprune.pruned(model, method, **kwargs):
            assert _generate(model, prompts) == batched


@pytest.mark.parametrize("family", QWEN_FAMILIES)
@pytest.mark.parametrize("method", sorted(set(vtprune.list_methods()) - {"var"}))
def test_every_method_runs_on_qwen_or_is_refused_at_prune(models, dyvte_routers, family, method):
    """A registered method either runs on Qwen-VL (in the matrix above) or prune() refuses it, saying why and what
    works instead, and the model stays unpruned. (VAR runs with calibrated sink_dims: tests/methods/test_var.py.)"""
    if method.startswith("_"):
        pytest.skip("test-only method")
    model = models(family)
    kwargs = settings(method, family, dyvte_routers) if method in METHODS else (
        dict(ratio=0.5) if method_class(method).has_budget else {})
    if method not in QWEN_REFUSED:
        with vtprune.pruned(model, method, **kwargs), torch.no_grad():
            model(**collate([make_prompt(model, family, 3, 0)]))
        return
    with pytest.raises(vtprune.PruneError, match=f"{QWEN_REFUSED[method]}.*inside the vision tower.*use a method"):
        vtprune.prune(model, method, **kwargs)
    assert not hasattr(model, "vtprune")


@pytest.mark.parametrize("family", ["qwen2_5_vl"])
def test_cdpruner_clip_relevance_is_refused_on_qwen_naming_the_llm_relevance(models, family):
    """No CLIP feature layer on Qwen-VL: relevance='clip' is a ConfigError pointing at relevance='llm'."""
    model = models(family)
    with pytest.raises(vtprune.ConfigError, match=r"cdpruner relevance='clip'.*expected 'llm' on qwen2_5_vl"):
        vtprune.prune(model, "cdpruner", ratio=0.5, relevance="clip", clip="/nonexistent")
    assert not hasattr(model, "vtprune")


@pytest.mark.parametrize("family,kv_mode", [("llava", "evict"), ("llava_next", "none"), ("internvl", "mixed"),
                                            ("qwen2_5_vl", "mixed"), ("qwen3_vl", "evict"), ("qwen3_vl_moe", "none")])
def test_zipvl_batch_equals_single(models, family, kv_mode):
    """ZipVL (a modulator, so not in METHODS) on every family, each KV mode once (tests/methods/test_zipvl.py runs
    all three on LLaVA): a left-padded batch decodes as each prompt alone, with the same layer-wise counts."""
    model = models(family)
    prompts = [make_prompt(model, family, text_len=3 + 4 * i, seed=i) for i in range(3)]
    with vtprune.pruned(model, "zipvl", tau=0.9, n_recent=8, n_random=8, kv_mode=kv_mode, recompress_every=3):
        batched = _generate(model, prompts)
        kept = model.vtprune.stats.reports["zipvl"].kept
        for i, p in enumerate(prompts):
            assert _generate(model, [p])[0] == batched[i]
            assert {l: k[0] for l, k in model.vtprune.stats.reports["zipvl"].kept.items()} == {l: k[i] for l, k in kept.items()}
