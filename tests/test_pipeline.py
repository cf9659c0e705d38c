"""Pipelines through the public API: method objects, names and YAML lists; a later method sees the earlier
one's kept layout (checked against an eager reference); plan errors at prune() time; no-op cuts build nothing;
images left with no tokens; unprune removes everything."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtprune
from vtprune.errors import ConfigError, PruneError
from vtprune.core.probes import FeatureLayer
from vtprune.methods import PAINT, VAR, FastV, FlowCut, RandomPrune, VisionZip
from vtprune.methods.base import Cut, Method, Selection
from vtprune.registry import register
from vtprune.stages import cut as cut_stage

from .conftest import FAMILIES, build_model, collate, make_prompt
from .helpers import kept_sequence_positions, merged_embeds
from .test_api import hook_snapshot as _snapshot


def test_a_later_method_scores_on_the_layout_the_earlier_one_left(models):
    """[Random(ratio=0.5), FastV(keep=8)]: FastV's kept set is the top-8 of layer 1's last-row attention of the
    sequence Random left (renumbered positions), computed here on an eager copy."""
    model = models("llava")
    eager = build_model("llava", attn="eager")
    eager.load_state_dict(model.state_dict())
    batch = collate([make_prompt(model, "llava", 5, 0)])
    with vtprune.pruned(model, [RandomPrune(ratio=0.5, seed=1), FastV(keep=8)]), torch.no_grad():
        model(**batch)
        random_stage, fastv_stage = model.vtprune.stats.images[0].stages
    assert (random_stage.method, fastv_stage.method) == ("random", "fastv")
    ids = batch["input_ids"][0]
    keep = kept_sequence_positions(ids, model.config.image_token_id, [random_stage.kept_index], [64])
    with torch.no_grad():
        attn = eager(inputs_embeds=merged_embeds(eager, batch)[:, keep], position_ids=torch.arange(keep.numel())[None],
                     output_attentions=True).attentions[1][0, :, -1]
    visual = torch.isin(keep, torch.nonzero(ids == model.config.image_token_id).flatten())
    top = torch.topk(attn[:, visual].mean(0), 8).indices.sort().values
    assert fastv_stage.kept_index == [random_stage.kept_index[i] for i in top.tolist()]
    assert fastv_stage.tokens_in == 32


def test_pipeline_forms_agree_and_unprune_removes_all(models, tmp_path):
    model = models("llava")
    batch = collate([make_prompt(model, "llava", 4, 2)])
    before = _snapshot(model)
    config = tmp_path / "pipeline.yaml"
    config.write_text("- method: visionzip\n  keep: 24\n- method: fastv\n  ratio: 0.5\n")
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("model: llava-1.5-7b\npipeline:\n  - {method: visionzip, keep: 24}\n  - {method: fastv, ratio: 0.5}\n")
    kept = []
    for how in ([VisionZip(keep=24), FastV(ratio=0.5)], [vtprune.method("visionzip", keep=24), vtprune.method("fastv", ratio=0.5)]):
        with vtprune.pruned(model, how), torch.no_grad():
            model(**batch)
            kept.append(model.vtprune.stats.images[0].kept_index)
    for path in (config, mapping):
        vtprune.prune(model, config=path)
        with torch.no_grad():
            model(**batch)
        assert model.vtprune.stats.method == "visionzip+fastv"
        kept.append(model.vtprune.stats.images[0].kept_index)
        vtprune.unprune(model)
    assert all(k == kept[0] for k in kept) and len(kept[0]) == 12
    assert _snapshot(model) == before
    assert vtprune.load_config(config)["pipeline"][1] == {"method": "fastv", "ratio": 0.5}


@pytest.mark.parametrize("pipeline, message", [
    (lambda: [FastV(ratio=0.5), VisionZip(keep=24)], "pipeline order: visionzip cuts at the LLM input, before fastv"),
    (lambda: [FlowCut(ratio=0.5), FastV(ratio=0.5, layer=1)], "fastv cuts at LLM layer 1, before flowcut"),
    (lambda: [FastV(ratio=0.5, layer=9)], "cuts before LLM layer 9, but the model has layers 0..3"),
])
def test_a_plan_that_cannot_work_is_refused_at_prune_time(models, pipeline, message):
    model = models("llava")
    before = _snapshot(model)
    with pytest.raises(PruneError, match=message):
        vtprune.prune(model, pipeline())
    assert not hasattr(model, "vtprune") and _snapshot(model) == before


@register
@dataclass
class _GridModulator(Method):
    """Test-only: a modulator that declares the feature-layer view (the full patch grid) and changes nothing."""

    name: ClassVar[str] = "_test_grid_modulator"
    description: ClassVar[str] = "test: reads the full grid in the LLM"
    has_budget: ClassVar[bool] = False
    prunes: ClassVar[bool] = False

    def cuts(self, model):
        return ()

    def probes(self, model):
        return (FeatureLayer(),)

    def modulated_layers(self, model):
        return (1,)


@register
@dataclass
class _TowerCut(Method):
    """Test-only: cuts patches before vision layer 1 only, keeping the first ones."""

    name: ClassVar[str] = "_test_tower_cut"
    description: ClassVar[str] = "test: a cut inside the vision tower"

    def cuts(self, model):
        return (Cut("vision", 1),)

    def score(self, image):
        return -image.index.float()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pipeline, reader, cutter", [
    (lambda: [PAINT(), FlowCut(ratio=0.5)], "paint", "flowcut"),
    (lambda: [PAINT(spatial_ratio=0.1), FlowCut(keep=8)], "paint", "flowcut"),
    (lambda: [_GridModulator(), FlowCut(ratio=0.5)], "_test_grid_modulator", "flowcut"),
    (lambda: [PAINT(), _TowerCut(ratio=0.5)], "paint", "_test_tower_cut"),
])
def test_a_cut_inside_the_tower_after_a_full_grid_modulator_is_refused(models, family, pipeline, reader, cutter):
    """A modulator acts in the LLM, after every vision cut, wherever it is listed: [PAINT, FlowCut] is refused at
    prune() like [FlowCut, PAINT] (it used to fail with a KeyError in the first forward); the model is untouched."""
    model = models(family)
    before = _snapshot(model)
    try:
        with pytest.raises(PruneError, match=rf"{cutter} cuts patches inside the vision tower, but {reader}, listed "
                                             rf"before it, reads the tower's full patch grid") as info:
            vtprune.prune(model, pipeline())
        assert str(info.value).endswith(f"after the tower has run, when the cut patches are gone, wherever it is "
                                        f"listed; run {reader} without {cutter}")  # one whole sentence
        with pytest.raises(PruneError, match=rf"{reader} reads the vision tower's full patch grid.*{cutter} already"):
            vtprune.prune(model, pipeline()[::-1])
        assert not hasattr(model, "vtprune") and _snapshot(model) == before
    finally:  # the shared model stays usable for the next test whatever happened
        if hasattr(model, "vtprune"):
            vtprune.unprune(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_tower_cuts_run_beside_methods_that_do_not_read_the_full_grid(models, family):
    """The rule is about the grid, not the names: a ratio-0 FlowCut after PAINT, VAR (residual stream) on either
    side of FlowCut and FastV after FlowCut prune and run; every stage is FlowCut's or FastV's."""
    model = models(family)
    batch = collate([make_prompt(model, family, 5, 0), make_prompt(model, family, 8, 1)])
    var = dict(sink_dims=(1,), tau=2.0)
    for pipeline in ([PAINT(), FlowCut(ratio=0.0)], [VAR(**var), FlowCut(ratio=0.5)], [FlowCut(ratio=0.5), VAR(**var)],
                     [FlowCut(ratio=0.5), FastV(ratio=0.5, layer=3)]):
        with vtprune.pruned(model, pipeline), torch.no_grad():
            logits = model(**batch).logits
            stages = {s.method for img in model.vtprune.stats.images for s in img.stages}
        assert torch.isfinite(logits).all()
        assert stages == {m.name for m in pipeline if m.prunes and not m.is_noop}


def test_pipeline_input_errors_are_clear(models, tmp_path):
    model = models("llava")
    with pytest.raises(ConfigError, match=r"pipeline entry 'fastv'.*vtprune.method\('fastv', keep=64\)"):
        vtprune.prune(model, ["fastv"])
    with pytest.raises(ConfigError, match="no keywords beside it"):
        vtprune.prune(model, [FastV(ratio=0.5)], keep=3)
    with pytest.raises(ConfigError, match="set ratio on the fastv object"):
        vtprune.prune(model, FastV(keep=8), ratio=0.5)
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline:\n  - {method: fastv, ratio: 0.5}\n  - {method: visonzip, keep: 3}\n")
    with pytest.raises(ConfigError, match="Did you mean 'visionzip'"):
        vtprune.load_config(bad)
    vtprune.prune(model, [FastV(ratio=0.5)])
    try:
        with pytest.raises(PruneError, match="already pruned with 'fastv'.*pipeline"):
            vtprune.prune(model, "random", ratio=0.5)
    finally:
        vtprune.unprune(model)
    assert not hasattr(model, "vtprune")


@register
@dataclass
class _KeepAll(Method):
    """Test-only: cuts before LLM layer 1 but keeps every token (as a learned exit that decides not to exit)."""

    name: ClassVar[str] = "_test_keep_all"
    description: ClassVar[str] = "test no-op cut"
    has_budget: ClassVar[bool] = False

    def cuts(self, model):
        return (Cut("llm", 1),)

    def select(self, image, n_keep):
        return Selection(keep=torch.arange(image.n))


def test_a_cut_that_keeps_everything_builds_nothing(models, monkeypatch):
    model = models("llava_next")
    batch = collate([make_prompt(model, "llava_next", 3 + 4 * i, i) for i in range(2)])
    with torch.no_grad():
        ref = model(**batch).logits
    built = []
    monkeypatch.setattr(cut_stage, "cut_layout", lambda *a, **k: built.append(1))
    with vtprune.pruned(model, "_test_keep_all"), torch.no_grad():
        out = model(**batch, use_cache=True)
        img = model.vtprune.stats.images[0]
    assert built == []  # no layout, no positions, no mask, no compaction
    assert torch.equal(out.logits, ref)
    assert {layer.keys.shape[-2] for layer in out.cache.layers} == {batch["input_ids"].shape[1]}
    assert [(s.stage, s.layer, s.tokens_in, s.tokens_out) for s in img.stages] == [("llm", 1, img.n_tokens, img.n_tokens)]


@register
@dataclass
class _DropFirstImage(Method):
    """Test-only: at the LLM input, drop every token of each sample's first image; keep the others whole."""

    name: ClassVar[str] = "_test_drop_first_image"
    description: ClassVar[str] = "test: an image left with no tokens"
    has_budget: ClassVar[bool] = False

    def select(self, image, n_keep):
        return Selection(keep=torch.arange(image.n if image.index_in_sample else 0))


def test_images_left_with_no_tokens_are_skipped_by_later_cuts(models):
    model = models("llava")
    prompts = [make_prompt(model, "llava", 4 + 3 * i, i, n_images=2) for i in range(2)]
    with vtprune.pruned(model, [_DropFirstImage(), FastV(keep=8)]), torch.no_grad():
        batched = model.generate(**collate(prompts), max_new_tokens=4)[:, -4:].tolist()
        stats = model.vtprune.stats
        singles = [model.generate(**collate([p]), max_new_tokens=4)[0, -4:].tolist() for p in prompts]
    assert batched == singles
    for img in stats.images:
        if img.image % 2 == 0:
            assert img.kept == 0 and [s.method for s in img.stages] == ["_test_drop_first_image"]
        else:
            assert [s.method for s in img.stages] == ["_test_drop_first_image", "fastv"] and img.kept == 8
