"""Stage "vision": patches cut between vision-encoder layers really leave the ViT; the LLM receives exactly the
projected survivors, recomputed here by running the encoder layers by hand on the kept rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtprune
from vtprune.methods.base import Cut, Method, top_k_sorted
from vtprune.registry import register

from .conftest import collate, make_prompt


@register
@dataclass
class _NormVisionCut(Method):
    """Test-only vision-stage method: keep the patches with the largest hidden-state norm before ``layer``."""

    layer: int = 1
    positions: str = "renumber"

    name: ClassVar[str] = "_test_vision_norm"
    description: ClassVar[str] = "test vision-stage method"

    def cuts(self, model):
        return (Cut("vision", self.layer),)

    def score(self, image):
        return image.embeds.float().norm(dim=-1)

    def select(self, image, n_keep):
        return super().select(image, n_keep)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_vision_stage_cut_matches_manual_vit(models, batch_size):
    model = models("llava")
    keep = 20
    prompts = [make_prompt(model, "llava", 3 + i, i) for i in range(batch_size)]
    batch = collate(prompts)
    tower = model.model.vision_tower
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].clone()

    lengths = []
    layer_hook = tower.encoder.layers[1].register_forward_hook(lambda m, a, o: lengths.append(o.shape[1]))
    try:
        with vtprune.pruned(model, "_test_vision_norm", keep=keep), torch.no_grad():
            lm_hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
            out = model(**batch)
            lm_hook.remove()
            stats = model.vtprune.stats
    finally:
        layer_hook.remove()
    assert lengths == [1 + keep]  # the ViT layer after the cut ran on CLS + kept patches only
    assert out.logits.shape[1] == batch["input_ids"].shape[1] - (64 - keep)
    with torch.no_grad():
        hs = tower(batch["pixel_values"], output_hidden_states=True).hidden_states
        for img in stats.images:
            h_in = hs[1][img.image]  # input of layer 1: [65, D]
            kept = top_k_sorted(h_in[1:].norm(dim=-1), keep)
            assert img.kept_index == kept.tolist()
            assert [s.stage for s in img.stages] == ["vision", "pre_llm"]
            h = h_in[torch.cat([torch.zeros(1, dtype=torch.long), kept + 1])][None]
            h = tower.encoder.layers[1](h, None)  # feature layer = -2 = output of layer 1 (of 0..2)
            h = h[0] if isinstance(h, tuple) else h
            expected = model.model.multi_modal_projector(h[:, 1:])[0]
            ids = batch["input_ids"][img.sample]
            pad = int((batch["attention_mask"][img.sample] == 0).sum())
            start = int(torch.nonzero(ids == model.config.image_token_id)[0])
            # the pruned layout is right-aligned: shift by how much shorter this sample became vs the longest
            row = captured["embeds"][img.sample]
            T_new = row.shape[0]
            new_start = start - pad + (T_new - (ids.numel() - pad - (64 - keep)))
            torch.testing.assert_close(row[new_start:new_start + keep], expected, atol=1e-5, rtol=1e-5)
