"""The shared cut machinery: appended (merged / recycled) tokens take the image's first free slots and reach the
LLM input exactly; two methods at one cut point run in order, the second on the first one's tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import vtprune
from vtprune.methods import RandomPrune, VisionZip
from vtprune.methods.base import Method, Selection, top_k_sorted
from vtprune.registry import register

from ..conftest import collate, make_prompt
from ..helpers import merged_embeds

KEEP, MERGED = 10, 3


@register
@dataclass
class _KeepAndMerge(Method):
    """Test-only: keep the KEEP largest-norm tokens and append MERGED tokens, each the mean of a third of the
    dropped ones (standing for the first token of its third)."""

    name: ClassVar[str] = "_test_keep_and_merge"
    description: ClassVar[str] = "test: appended tokens"
    has_budget: ClassVar[bool] = False

    def select(self, image, n_keep):
        keep = top_k_sorted(image.embeds.float().norm(dim=-1), KEEP)
        dropped = torch.nonzero(~torch.isin(torch.arange(image.n), keep)).flatten()
        groups = dropped.tensor_split(MERGED)
        return Selection(keep=keep, extra_values=torch.stack([image.embeds[g].mean(0) for g in groups]),
                         extra_index=torch.stack([image.index[g[0]] for g in groups]))


def test_appended_tokens_take_the_first_free_slots(models):
    model = models("llava")
    batch = collate([make_prompt(model, "llava", 4, 0)])
    seen = {}
    with vtprune.pruned(model, "_test_keep_and_merge"):
        def grab(module, args, kwargs):
            seen["embeds"] = kwargs["inputs_embeds"].clone()

        hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                model(**batch)
        finally:
            hook.remove()
        img = model.vtprune.stats.images[0]
    ids = batch["input_ids"][0]
    full = merged_embeds(model, batch)[0]
    pos = torch.nonzero(ids == model.config.image_token_id).flatten()
    feats = full[pos]
    keep = top_k_sorted(feats.float().norm(dim=-1), KEEP)
    dropped = torch.nonzero(~torch.isin(torch.arange(64), keep)).flatten()
    groups = dropped.tensor_split(MERGED)
    free = dropped[:MERGED]  # the lowest slots not kept
    slots = torch.sort(torch.cat([keep, free])).values
    rows = torch.where(torch.isin(slots, keep)[:, None], feats[slots], 0.0)
    for g, slot in zip(groups, free):
        rows[(slots == slot).nonzero()[0, 0]] = feats[g].mean(0)
    start = int(pos[0])
    got = seen["embeds"][0, start:start + KEEP + MERGED]
    torch.testing.assert_close(got, rows, atol=1e-6, rtol=0)
    torch.testing.assert_close(seen["embeds"][0, :start], full[:start], atol=0, rtol=0)
    assert img.kept == KEEP + MERGED
    assert img.kept_index == sorted(set(keep.tolist()) | {int(g[0]) for g in groups})


def test_two_methods_at_one_cut_point_run_in_pipeline_order(models):
    model = models("llava")
    batch = collate([make_prompt(model, "llava", 4, 1)])
    with vtprune.pruned(model, [RandomPrune(ratio=0.5, seed=2), VisionZip(keep=12)]), torch.no_grad():
        model(**batch)
        first, second = model.vtprune.stats.images[0].stages
    assert (first.method, first.stage, first.tokens_out) == ("random", "pre_llm", 32)
    assert (second.method, second.stage, second.tokens_in, second.tokens_out) == ("visionzip", "pre_llm", 32, 12)
    assert set(second.kept_index) <= set(first.kept_index)  # VisionZip chose among the tokens Random kept
