"""VisionZip (spec §4): dominant tokens = top-(D-1) patches by CLS attention at the feature layer, read here
from an eager copy's vision ``output_attentions``; contextual tokens follow the uniform-target rule."""

from __future__ import annotations

import re

import pytest
import torch

import vtprune
from vtprune.registry import make_method

from ..conftest import build_model, collate, make_prompt


def _cls_attention(eager, batch, layer):
    with torch.no_grad():
        out = eager.model.vision_tower(batch["pixel_values"], output_attentions=True)
    return out.attentions[layer][:, :, 0].sum(1)  # [crops, S], summed over heads


@pytest.mark.parametrize("keep", [16, 32])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_llava_dominant_tokens_are_top_cls_attention(models, keep, batch_size):
    model = models("llava")
    eager = build_model("llava", attn="eager")
    eager.load_state_dict(model.state_dict())
    prompts = [make_prompt(model, "llava", 3 + i, i) for i in range(batch_size)]
    batch = collate(prompts)
    feature_layer = len(model.model.vision_tower.encoder.layers) - 2  # vision_feature_layer = -2
    cls = _cls_attention(eager, batch, feature_layer)
    with vtprune.pruned(model, "visionzip", keep=keep), torch.no_grad():
        out = model(**batch)
        stats = model.vtprune.stats
    assert out.logits.shape[1] == batch["input_ids"].shape[1] - (64 - keep)
    n_dom = round(keep * 54 / 64)
    n_ctx = keep - n_dom
    for img in stats.images:
        scores = cls[img.image, 1:]  # drop CLS itself; patch j is token j
        dominant = torch.topk(scores, n_dom - 1).indices  # CLS fills the last dominant slot
        rest = sorted(set(range(64)) - set(dominant.tolist()))
        step = max(1, len(rest) // n_ctx)
        targets = rest[::step][:n_ctx]
        assert img.kept_index == sorted(dominant.tolist() + targets)
        assert img.kept == keep


def test_llava_llm_receives_cls_dominant_and_merged_contextual_tokens(models):
    """The LLM input = projector([CLS; dominant patches; target + mean(assigned)]) recomputed here from the
    vision tower's hidden states and the feature layer's keys (cosine of head-averaged keys)."""
    model = models("llava")
    keep = 16
    prompt = make_prompt(model, "llava", 4, 0)
    batch = collate([prompt])
    tower = model.model.vision_tower
    layer = len(tower.encoder.layers) - 2
    with torch.no_grad():
        vis = tower(batch["pixel_values"], output_hidden_states=True, output_attentions=False)
        hs = vis.hidden_states[layer + 1][0]  # output of the feature layer: [65, D]
        attn = tower.encoder.layers[layer]
        x = attn.layer_norm1(vis.hidden_states[layer][0])
        heads = attn.self_attn.num_heads
        keys = attn.self_attn.k_proj(x).view(65, heads, -1).mean(1)
    captured = {}

    def grab(module, args, kwargs):  # registered after vtprune's own hook, so it sees the pruned embeddings
        captured["embeds"] = kwargs["inputs_embeds"].clone()

    with vtprune.pruned(model, "visionzip", keep=keep), torch.no_grad():
        hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        model(**batch)
        hook.remove()
        kept = model.vtprune.stats.images[0].kept_index
    n_dom, n_ctx = round(keep * 54 / 64), keep - round(keep * 54 / 64)
    eager = build_model("llava", attn="eager")
    eager.load_state_dict(model.state_dict())
    cls = _cls_attention(eager, batch, layer)[0, 1:]
    dominant = sorted(torch.topk(cls, n_dom - 1).indices.tolist())
    rest = [i for i in range(64) if i not in dominant]
    step = max(1, len(rest) // n_ctx)
    targets = rest[::step][:n_ctx]
    members = [i for i in rest if i not in targets]
    kn = torch.nn.functional.normalize(keys[1:], dim=-1)
    assign = (kn[members] @ kn[targets].T).argmax(-1)
    ctx = []
    for c, t in enumerate(targets):
        group = [members[j] for j in range(len(members)) if int(assign[j]) == c]
        extra = hs[1:][group].mean(0) if group else torch.zeros_like(hs[0])
        ctx.append(hs[1 + t] + extra)
    values = torch.cat([hs[:1], hs[1:][dominant], torch.stack(ctx)])
    with torch.no_grad():
        expected = model.model.multi_modal_projector(values)
    start = int(torch.nonzero(prompt.input_ids == model.config.image_token_id)[0])
    got = captured["embeds"][0, start:start + keep]
    assert kept == sorted(dominant + targets)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("field,value", [("dominant_fraction", 0.0), ("dominant_fraction", 1.5),
                                         ("dominant_fraction", float("nan")), ("anyres", "tiles")])
def test_out_of_range_fields_name_method_field_and_value(field, value):
    with pytest.raises(ValueError, match=re.escape(f"visionzip {field}={value!r}")):
        make_method("visionzip", keep=8, **{field: value})
