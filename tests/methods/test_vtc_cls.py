"""VTC-CLS (spec §2): kept set = top-U of the CLS attention (head mean, CLS column dropped, not renormalised)
summed over vision layers start..s, read from an eager copy's ``output_attentions``; contiguous positions.
``start_layer`` indexes the layers like the official ``attentions[start_layer:-1]`` (Python slicing)."""

from __future__ import annotations

import re

import pytest
import torch

import vtprune
from vtprune.errors import ConfigError
from vtprune.methods import VTCCLS

from ..conftest import build_model, collate, make_prompt


@pytest.mark.parametrize("family", ["llava", "internvl"])
@pytest.mark.parametrize("start_layer", [0, 1, -2, None])
@pytest.mark.parametrize("keep", [4, 10])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_vtc_cls_keeps_top_of_layer_ensembled_cls_attention(models, family, start_layer, keep, batch_size):
    model = models(family)
    eager = build_model(family, attn="eager")
    eager.load_state_dict(model.state_dict())
    prompts = [make_prompt(model, family, 3 + i, 4 + 2 * i) for i in range(batch_size)]
    batch = collate(prompts)
    adapter_s = {"llava": 1, "internvl": 2}[family]  # feature layer of the 3-layer test towers
    start = min(3 * 16 // 24, adapter_s) if start_layer is None else start_layer  # default: 16-of-24 depth
    layers = list(range(3))[start:adapter_s + 1]  # Python slicing, as the official attentions[s:-1]
    assert layers
    with torch.no_grad():
        attn = eager.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions
    cls = sum(attn[l][:, :, 0, 1:].mean(1) for l in layers)  # [crops, patches]
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


def test_start_layer_follows_the_official_python_slice():
    # CLIP-L, LLaVA-1.5: 24 layers, features after layer 22; the official code sums attentions[s:-1]
    official = list(range(24))
    for s in range(-24, 24):
        if official[s:-1]:
            assert list(VTCCLS(ratio=0.5, start_layer=s).layers(24, 22)) == official[s:-1]
        else:  # s = 23 or -1: nothing to ensemble (the official code fails on the empty sum)
            with pytest.raises(ConfigError):
                VTCCLS(ratio=0.5, start_layer=s).layers(24, 22)
    assert list(VTCCLS(ratio=0.5, start_layer=-2).layers(24, 22)) == [22]
    assert list(VTCCLS(ratio=0.5, start_layer=-2).layers(24, 23)) == [22, 23]  # InternViT reads its last layer


@pytest.mark.parametrize("start_layer, message", [
    (23, "start_layer=23 is past the feature layer 22 the model reads (tower layers 0..23); use 0..22, -24..-2"),
    (-1, "start_layer=-1 (vision layer 23) is past the feature layer 22"),  # official: an empty slice
    (-25, "start_layer=-25 (vision layer -1) is before the first layer"),
])
def test_start_layer_outside_the_tower_is_an_error_not_a_clamp(start_layer, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        VTCCLS(ratio=0.5, start_layer=start_layer).layers(24, 22)


@pytest.mark.parametrize("n_layers, feature_layer, expected", [
    (24, 22, range(16, 23)),  # official --layer 16 on CLIP-L (K = 7)
    (24, 23, range(16, 24)),  # InternViT-300M reads its last layer
    (32, 30, range(21, 31)),  # same relative depth
    (4, 2, range(2, 3)),  # the embedded tiny-llava
    (3, 1, range(1, 2)),  # test towers: at most the feature layer
    (1, 0, range(0, 1)),
])
def test_default_start_layer_is_the_official_depth_and_fits_every_tower(n_layers, feature_layer, expected):
    assert VTCCLS(ratio=0.5).layers(n_layers, feature_layer) == expected


def test_start_layer_past_the_feature_layer_fails_at_prune_and_leaves_the_model_alone(models):
    model = models("llava")  # 3 vision layers, features after layer 1
    for start_layer, message in [(2, "start_layer=2 is past the feature layer 1"), (16, "start_layer=16 is past"),
                                 (-1, "start_layer=-1 (vision layer 2) is past the feature layer 1")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            vtprune.prune(model, "vtc_cls", ratio=0.5, start_layer=start_layer)
        assert not hasattr(model, "vtprune")
    with vtprune.pruned(model, "vtc_cls", ratio=0.5):  # the default fits
        model(**collate([make_prompt(model, "llava", 4, 0)]))
