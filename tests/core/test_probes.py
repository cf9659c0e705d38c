"""Each probe's per-image (per-crop) view holds what its docstring says: checked against an eager copy's own
``output_attentions`` and against forward hooks on the unpruned model, never against vtprune code."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtprune
from vtprune.core.probes import LLMAttention, Residual, Sublayer, SublayerRows, VisionAttentionMap, VisionCLS
from vtprune.errors import PruneError
from vtprune.methods.base import Cut, Method
from vtprune.registry import register

from ..conftest import IMAGE_TOKEN, Prompt, build_model, collate, make_prompt

SEEN: list[dict] = []  # what the spy read, one entry per (view, probe)
TOL = dict(atol=1e-5, rtol=1e-4)


def _copy(x):
    if isinstance(x, SublayerRows):
        return (x.input.detach().clone(), x.output.detach().clone())
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return tuple(_copy(v) for v in x)
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    return x


@register
@dataclass
class _ProbeSpy(Method):
    """Test-only method: cuts at ``at``, declares ``watch``, reads ``read`` (default: ``watch``) into SEEN and
    keeps the tokens with the largest embedding norm."""

    watch: tuple = ()
    read: tuple | None = None
    at: Cut = Cut("llm", 3)

    name: ClassVar[str] = "_test_probe_spy"
    description: ClassVar[str] = "test probe reader"

    def cuts(self, model):
        return (self.at,)

    def probes(self, model):
        return self.watch

    def score(self, image):
        for p in self.watch if self.read is None else self.read:
            SEEN.append(dict(sample=image.sample, image=image.image, n=image.n, probe=p, value=_copy(image[p])))
        return image.embeds.float().norm(dim=-1)


def _spy(model, batch, keep, **fields):
    SEEN.clear()
    with vtprune.pruned(model, _ProbeSpy(keep=keep, **fields)), torch.no_grad():
        model(**batch)
    assert SEEN, "the spy was never asked"
    return list(SEEN)


def _eager(models, family):
    model = models(family)
    eager = build_model(family, attn="eager")
    eager.load_state_dict(model.state_dict())
    return model, eager


def _image_pos(batch, sample, n):
    pos = torch.nonzero(batch["input_ids"][sample] == IMAGE_TOKEN).flatten()  # one image per prompt here
    assert pos.numel() == n
    return pos


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_llm_attention_last_row_at_a_layer_before_a_later_cut(models, family):
    """LLMAttention(1) read at a cut before LLM layer 3: [H, n] = eager attentions[1][b, :, -1, image positions]."""
    model, eager = _eager(models, family)
    batch = collate([make_prompt(model, family, 3 + 4 * i, i) for i in range(2)])
    with torch.no_grad():
        attn = eager(**batch, output_attentions=True).attentions[1]
    seen = _spy(model, batch, keep=8, watch=(LLMAttention(1),), at=Cut("llm", 3))
    assert sorted(s["sample"] for s in seen) == [0, 1]
    for s in seen:
        pos = _image_pos(batch, s["sample"], s["n"])
        assert s["value"].shape == (attn.shape[1], s["n"])
        torch.testing.assert_close(s["value"], attn[s["sample"], :, -1, pos], **TOL)


@pytest.mark.parametrize("family, padded", [
    ("llava", True), ("internvl", True),
    ("llava", False), ("internvl", False),  # no padding: SDPA passes no mask (is_causal), the probe masks itself
])
def test_llm_attention_instruction_rows_of_samples_with_different_instruction_lengths(models, family, padded):
    """queries="instruction": [H, q, n], one row per prompt token after the sample's last image token (q differs
    between the two samples), columns the image's tokens, in the unpruned layout (probe layer 0, cut at 2).
    Unpadded: the second prompt alone, so the model passes no attention mask."""
    model, eager = _eager(models, family)
    p0, p1 = make_prompt(model, family, 3, 0), make_prompt(model, family, 6, 1)
    p1 = Prompt(torch.cat([p1.input_ids, torch.tensor([5, 6, 7, 8])]), p1.pixel_values)  # 4 more after the image
    batch = collate([p0, p1] if padded else [p1])
    with torch.no_grad():
        attn = eager(**batch, output_attentions=True).attentions[0]
    probe = LLMAttention(0, queries="instruction")
    seen = _spy(model, batch, keep=8, watch=(probe,), at=Cut("llm", 2))
    qs = {}
    for s in seen:
        pos = _image_pos(batch, s["sample"], s["n"])
        rows = torch.arange(int(pos[-1]) + 1, batch["input_ids"].shape[1])
        qs[s["sample"]] = rows.numel()
        assert s["value"].shape == (attn.shape[1], rows.numel(), s["n"])
        torch.testing.assert_close(s["value"], attn[s["sample"]][:, rows][:, :, pos], **TOL)
    extra = 1 if family == "internvl" else 0  # InternVL's image-end token follows the last image token
    assert qs == ({0: 3 + extra, 1: 7 + extra} if padded else {0: 7 + extra})


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_residual_and_sublayers_equal_the_models_own_values(models, family):
    """Residual(1) = input of decoder layer 1; Sublayer(1, part) = (input, output) of its self_attn / mlp,
    taken with forward hooks on the unpruned model, sliced at the image's positions (cut at layer 2)."""
    model = models(family)
    batch = collate([make_prompt(model, family, 3 + 4 * i, i) for i in range(2)])
    layer, ref = model.model.language_model.layers[1], {}

    def x_of(args, kwargs):
        return (args[0] if args else kwargs["hidden_states"]).clone()

    hooks = [
        layer.register_forward_pre_hook(lambda m, a, k: ref.__setitem__("res", x_of(a, k)), with_kwargs=True),
        layer.self_attn.register_forward_hook(
            lambda m, a, k, o: ref.__setitem__("attn", (x_of(a, k), o[0].clone())), with_kwargs=True),
        layer.mlp.register_forward_hook(
            lambda m, a, k, o: ref.__setitem__("mlp", (x_of(a, k), o.clone())), with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    probes = (Residual(1), Sublayer(1, "attn"), Sublayer(1, "mlp"))
    seen = _spy(model, batch, keep=8, watch=probes, at=Cut("llm", 2))
    assert len(seen) == 2 * len(probes)
    for s in seen:
        b, pos, p = s["sample"], _image_pos(batch, s["sample"], s["n"]), s["probe"]
        if isinstance(p, Residual):
            torch.testing.assert_close(s["value"], ref["res"][b, pos], **TOL)
        else:
            x, y = ref[p.part]
            assert len(s["value"]) == 2
            torch.testing.assert_close(s["value"][0], x[b, pos], **TOL)
            torch.testing.assert_close(s["value"][1], y[b, pos], **TOL)


def _vision_attentions(eager, batch):
    with torch.no_grad():
        return eager.model.vision_tower(batch["pixel_values"], output_attentions=True).attentions


def test_vision_cls_at_the_llm_input_is_the_head_mean_cls_row_per_token(models):
    """LLaVA at Cut("pre_llm"): {layer: [N]}, token i = head-mean CLS attention to vision position i + 1."""
    model, eager = _eager(models, "llava")
    batch = collate([make_prompt(model, "llava", 3 + 2 * i, i) for i in range(2)])
    attn = _vision_attentions(eager, batch)
    seen = _spy(model, batch, keep=16, watch=(VisionCLS((0, 1)),), at=Cut("pre_llm"))
    assert sorted(s["image"] for s in seen) == [0, 1]
    for s in seen:
        assert sorted(s["value"]) == [0, 1]
        for l, v in s["value"].items():
            assert v.shape == (s["n"],)
            torch.testing.assert_close(v, attn[l][s["image"], :, 0, 1:].mean(0), **TOL)


def test_vision_cls_and_attention_map_at_a_vision_cut_are_per_crop(models):
    """LLaVA at Cut("vision", 1): VisionCLS((0,)) = {0: [H, n+1]} eager CLS row of layer 0 with every head,
    VisionAttentionMap((0,)) = {0: [n+1, n+1]} eager head-mean map of layer 0, for each crop of the batch."""
    model, eager = _eager(models, "llava")
    batch = collate([make_prompt(model, "llava", 3 + 2 * i, i) for i in range(2)])
    attn = _vision_attentions(eager, batch)[0]  # [crops, H, 65, 65]
    seen = _spy(model, batch, keep=32, watch=(VisionCLS((0,)), VisionAttentionMap((0,))), at=Cut("vision", 1))
    assert sorted((s["image"], type(s["probe"]).__name__) for s in seen) == [
        (c, name) for c in (0, 1) for name in ("VisionAttentionMap", "VisionCLS")]
    for s in seen:
        c, value = s["image"], s["value"]
        assert s["n"] == 64 and list(value) == [0]
        if isinstance(s["probe"], VisionCLS):
            assert value[0].shape == (attn.shape[1], 65)
            torch.testing.assert_close(value[0], attn[c, :, 0, :], **TOL)
        else:
            assert value[0].shape == (65, 65)
            torch.testing.assert_close(value[0], attn[c].mean(0), **TOL)


def test_reading_an_undeclared_probe_names_it_and_leaves_the_model_unpruned(models):
    model = models("llava")
    batch = collate([make_prompt(model, "llava", 4, 0)])
    with torch.no_grad():
        ref = model(**batch).logits
    probe = LLMAttention(1)
    msg = re.escape(str(probe)) + r".*return it from probes\(\)"
    with pytest.raises(PruneError, match=msg):
        with vtprune.pruned(model, _ProbeSpy(keep=8, watch=(), read=(probe,), at=Cut("llm", 3))), torch.no_grad():
            model(**batch)
    assert not hasattr(model, "vtprune")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref, atol=0, rtol=0)
