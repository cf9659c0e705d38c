"""DART, DivPrune and CDPruner together (issue 28, "All"): a left-padded batch with several images per sample
equals each sample alone, beam search keeps each prompt's kept set, DART decides the same under eager and SDPA,
CDPruner's per-crop LLaVA-NeXT budget."""

from __future__ import annotations

import pytest
import torch

import vtprune

from ..conftest import collate, make_prompt
from ..helpers import image_positions, kept_batched_and_alone, merged_embeds

METHODS = {"dart": dict(keep=12, pivot_image=2, pivot_text=2), "divprune": dict(keep=12),
           "cdpruner": dict(keep=12, relevance="llm", anyres="global")}
STEPS = 4


def _generate(model, batch, **kwargs):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=STEPS, do_sample=False, **kwargs)[:, -STEPS:].tolist()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_batch_with_two_image_samples_equals_each_alone(models, method):
    model = models("llava")
    prompts = [make_prompt(model, "llava", 3 + 4 * i, i, n_images=2 - i % 2) for i in range(3)]
    with vtprune.pruned(model, method, **METHODS[method]):
        batched = _generate(model, collate(prompts))
        kept = [(i.sample, i.kept_index) for i in model.vtprune.stats.images]
        single, kept_single = [], []
        for b, p in enumerate(prompts):
            single += _generate(model, collate([p]))
            kept_single += [(b, i.kept_index) for i in model.vtprune.stats.images]
    assert len(kept) == 5 and all(len(k) == 12 for _, k in kept)
    assert batched == single and kept == kept_single


@pytest.mark.parametrize("method", sorted(METHODS))
def test_beam_search_keeps_each_prompts_kept_set(models, method):
    model = models("llava")
    prompts = [make_prompt(model, "llava", 3 + 4 * i, i) for i in range(2)]
    with vtprune.pruned(model, method, **METHODS[method]):
        single = []
        for p in prompts:
            with torch.no_grad():
                model(**collate([p]))
            single.append(model.vtprune.stats.images[0].kept_index)
        _generate(model, collate(prompts), num_beams=2)
        beams = [i.kept_index for i in model.vtprune.stats.images]
    assert beams == [single[0], single[0], single[1], single[1]]


def test_dart_decides_the_same_under_eager_and_sdpa(models, eager_copy):
    batch = collate([make_prompt(models("llava"), "llava", 6, 2)])
    kept = []
    for model in (models("llava"), eager_copy("llava")):
        with vtprune.pruned(model, "dart", **METHODS["dart"]), torch.no_grad():
            model(**batch)
            kept.append(model.vtprune.stats.images[0].kept_index)
    assert kept[0] == kept[1]


def test_cdpruner_next_per_crop_budget(models):
    """T per crop on each crop's patches; newline tokens stay; picks the model unpadded away are lost."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model = models("llava_next")
    prompts = [make_prompt(model, "llava_next", 3 + 4 * i, i) for i in range(3)]
    per_crop = 8
    with vtprune.pruned(model, "cdpruner", keep=per_crop, relevance="llm"):
        batched, single = kept_batched_and_alone(model, (collate(prompts), [collate([p]) for p in prompts]))
    assert batched == single
    for p, kept in zip(prompts, batched):
        batch = collate([p])
        rows = merged_embeds(model, batch)[0][image_positions(batch["input_ids"][0], model.config.image_token_id)]
        newline = torch.nonzero((rows == model.model.image_newline).all(1)).flatten().tolist()
        crops = int(image_size_to_num_patches(p.image_sizes[0], model.config.image_grid_pinpoints, 32))
        assert newline and set(newline) <= set(kept)
        assert 0 < len(kept) - len(newline) <= crops * per_crop
