"""kvpress-style matrix: every method x model family x batch size.

A left-padded batch of prompts of different lengths (and, for LLaVA-NeXT, different image sizes and so
different visual-token counts) must give the same greedy tokens as each prompt alone; the kept sets must
respect the budget, be sorted and be deterministic.
"""

from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.budget import tokens_to_keep

from .conftest import FAMILIES, collate, make_prompt

METHODS = {
    "random": dict(ratio=0.6),
    "fastv": dict(ratio=0.6),
    "visionzip": dict(keep=12),
    "vtc_cls": dict(ratio=0.6, start_layer=0),
    "flowcut": dict(ratio=0.75, shared_prune_count=False),
}
BUDGET_KEYS = ("ratio", "keep")
STEPS = 8


def _next_crops(model, size) -> int:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return int(image_size_to_num_patches(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size))


def _generate(model, prompts):
    with torch.no_grad():
        out = model.generate(**collate(prompts), max_new_tokens=STEPS, do_sample=False)
    return out[:, -STEPS:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("batch_size", [1, 3])
def test_batch_equals_single_and_budget(models, family, method, batch_size):
    model = models(family)
    prompts = [make_prompt(model, family, text_len=3 + 4 * i, seed=i) for i in range(batch_size)]
    with vtprune.pruned(model, method, **METHODS[method]):
        batched = _generate(model, prompts)
        stats = model.vtprune.stats
        nominal = model.vtprune.adapter.nominal_tokens
        assert len(stats.images) == batch_size
        for img in stats.images:
            expected = tokens_to_keep(img.n_tokens, METHODS[method].get("ratio"), METHODS[method].get("keep"), nominal)
            if method == "visionzip" and family == "llava_next":  # the official budget is per crop
                crops = _next_crops(model, prompts[img.sample].image_sizes[0])
                per_crop = tokens_to_keep(nominal, METHODS[method].get("ratio"), METHODS[method].get("keep"), nominal)
                expected = min(img.n_tokens, crops * per_crop)
            if method == "flowcut" and family == "llava_next":
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
