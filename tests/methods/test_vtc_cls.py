"""VTC-CLS (spec §2): kept set = top-U of the CLS attention (head mean, CLS column dropped, not renormalised)
summed over vision layers start..s, read from an eager copy's ``output_attentions``; contiguous positions."""

from __future__ import annotations

import pytest
import torch

import vtprune

from ..conftest import build_model, collate, make_prompt


@pytest.mark.parametrize("family", ["llava", "internvl"])
@pytest.mark.parametrize("start_layer", [0, 1, -1])
@pytest.mark.parametrize("keep", [4, 10])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_vtc_cls_keeps_top_of_layer_ensembled_cls_attention(models, family, start_layer, keep, batch_size):
    model = models(family)
    eager = build_model(family, attn="eager")
    eager.load_state_dict(model.state_dict())
    prompts = [make_prompt(model, family, 3 + i, 4 + 2 * i) for i in range(batch_size)]
    batch = collate(prompts)
    adapter_s = {"llava": 1, "internvl": 2}[family]  # feature layer of the 3-layer test towers
    start = adapter_s + start_layer if start_layer < 0 else start_layer
    with torch.no_grad():
        attn = eager.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions
    cls = sum(attn[l][:, :, 0, 1:].mean(1) for l in range(start, adapter_s + 1))  # [crops, patches]
    with vtprune.pruned(model, "vtc_cls", keep=keep, start_layer=start_layer), torch.no_grad():
        model(**batch)
        stats = model.vtprune.stats
    if family == "internvl":  # each LLM token pools a 2x2 patch group (the model's own pixel shuffle)
        side = int(cls.shape[1] ** 0.5)
        ids = torch.arange(side * side, dtype=torch.float64).reshape(1, side, side, 1)
        src = model.model.pixel_shuffle(ids, scale_factor=0.5).reshape(-1, 4).long()  # [tokens, 4] patch indices
        cls = cls[:, src].sum(-1)
    crop = 0
    for img in stats.images:
        n_crops = img.n_tokens // cls.shape[1]
        score = cls[crop:crop + n_crops].reshape(-1)
        crop += n_crops
        assert img.kept_index == sorted(torch.topk(score, img.kept).indices.tolist())
        assert img.kept == keep * n_crops
