"""Stage semantics against independent references built from the model's own pieces."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtprune
from vtprune.core.probes import LLMAttention
from vtprune.methods.base import Cut, Method
from vtprune.methods.fastv import FastV
from vtprune.registry import register

from .conftest import FAMILIES, build_model, collate, make_prompt
from .helpers import greedy_from_embeds, kept_sequence_positions, merged_embeds, slow_in_llm_generate

STEPS = 8


def _pruned_generate(model, batch):
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    return out.sequences[0, -STEPS:].tolist(), out.logits[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", ["renumber", "original"])
def test_pre_llm_generate_equals_manually_pruned_sequence(models, family, positions):
    model = models(family)
    prompt = make_prompt(model, family, 6, 1)
    batch = collate([prompt])
    with vtprune.pruned(model, "random", ratio=0.7, positions=positions, seed=3):
        tokens, first_logits = _pruned_generate(model, batch)
        stats = model.vtprune.stats
    ids = batch["input_ids"][0]
    keep = kept_sequence_positions(ids, model.config.image_token_id, [i.kept_index for i in stats.images],
                                   [i.n_tokens for i in stats.images])
    embeds = merged_embeds(model, batch)[:, keep]
    pos = keep[None] if positions == "original" else torch.arange(keep.numel())[None]
    ref_tokens, ref_logits = greedy_from_embeds(model, embeds, pos, STEPS)
    assert tokens == ref_tokens
    torch.testing.assert_close(first_logits, ref_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer_k", [1, 2])
def test_in_llm_cache_holds_kept_tokens_and_decode_matches_slow_reference(models, family, layer_k):
    model = models(family)
    prompt = make_prompt(model, family, 5, 2)
    batch = collate([prompt])
    T = prompt.input_ids.numel()
    with vtprune.pruned(model, "fastv", ratio=0.5, layer=layer_k):
        with torch.no_grad():
            out = model(**batch, use_cache=True)
        stats = model.vtprune.stats
        removed = sum(i.n_tokens - i.kept for i in stats.images)
        lengths = [layer.keys.shape[-2] for layer in out.cache.layers]
        assert lengths == [T] * layer_k + [T - removed] * (len(lengths) - layer_k)
        tokens, first_logits = _pruned_generate(model, batch)
    keep = kept_sequence_positions(batch["input_ids"][0], model.config.image_token_id,
                                   [i.kept_index for i in stats.images], [i.n_tokens for i in stats.images])
    ref_tokens, ref_logits = slow_in_llm_generate(model, merged_embeds(model, batch), keep, layer_k, STEPS)
    assert tokens == ref_tokens
    torch.testing.assert_close(first_logits, ref_logits, atol=1e-5, rtol=0)


@register
@dataclass
class _TwoCuts(FastV):
    """Test-only multi-K method (PyramidDrop-like): FastV scoring before layers 1 and 3, half each time."""

    name: ClassVar[str] = "_test_two_cuts"
    description: ClassVar[str] = "test multi-cut"

    def cuts(self, model):
        return (Cut("llm", 1), Cut("llm", 3))

    def probes(self, model):
        return (LLMAttention(0), LLMAttention(2))

    def score(self, image):
        return image[LLMAttention(image.layer - 1)].mean(0)

    def budget(self, image):
        return max(1, image.n // 2)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_several_cut_layers_shrink_the_cache_stepwise_and_batch_equals_single(models, family):
    model = models(family)
    prompts = [make_prompt(model, family, 3 + 4 * i, i) for i in range(3)]
    with vtprune.pruned(model, "_test_two_cuts", ratio=0.5), torch.no_grad():
        out = model(**collate(prompts[:1]), use_cache=True)
        img = model.vtprune.stats.images[0]
        n, T = img.n_tokens, prompts[0].input_ids.numel()
        assert [st.layer for st in img.stages] == [1, 3]
        assert [st.tokens_out for st in img.stages] == [n // 2, n // 4]
        lengths = [layer.keys.shape[-2] for layer in out.cache.layers]
        assert lengths == [T, T - (n - n // 2), T - (n - n // 2), T - (n - n // 4)]
        assert img.equivalent_tokens == (n + 2 * (n // 2) + n // 4) / 4
        batched = model.generate(**collate(prompts), max_new_tokens=STEPS)[:, -STEPS:].tolist()
        singles = [model.generate(**collate([p]), max_new_tokens=STEPS)[0, -STEPS:].tolist() for p in prompts]
    assert batched == singles


def test_in_llm_renumbered_positions_match_slow_reference(models):
    """positions="renumber" inside the LLM: layers >= K see contiguous positions over the kept tokens."""
    model = models("llava")
    batch = collate([make_prompt(model, "llava", 5, 2)])
    with vtprune.pruned(model, "fastv", ratio=0.5, layer=2, positions="renumber"):
        tokens, first_logits = _pruned_generate(model, batch)
        stats = model.vtprune.stats
    keep = kept_sequence_positions(batch["input_ids"][0], model.config.image_token_id,
                                   [i.kept_index for i in stats.images], [i.n_tokens for i in stats.images])
    ref, ref_logits = slow_in_llm_generate(model, merged_embeds(model, batch), keep, 2, STEPS, renumber=True)
    assert tokens == ref
    torch.testing.assert_close(first_logits, ref_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("keep", [8, 12])
def test_fastv_keeps_top_k_of_eager_last_token_attention(models, family, keep):
    """FastV's kept set = top-k of layer K-1's last-row attention averaged over heads, read here from an eager
    copy's ``output_attentions`` (the pruned model itself stays on SDPA)."""
    model = models(family)
    eager = build_model(family, attn="eager")
    eager.load_state_dict(model.state_dict())
    prompts = [make_prompt(model, family, 3 + 2 * i, i) for i in range(2)]
    batch = collate(prompts)
    with torch.no_grad():
        attn = eager(**batch, output_attentions=True).attentions[1]  # layer K-1 = 1
    with vtprune.pruned(model, "fastv", keep=keep, layer=2), torch.no_grad():
        model(**batch)
        stats = model.vtprune.stats
    assert model.config.text_config._attn_implementation == "sdpa"
    nominal = {"llava": 64, "llava_next": 64, "internvl": 16}[family]
    for img in stats.images:
        ids = batch["input_ids"][img.sample]
        pos = torch.nonzero(ids == model.config.image_token_id).flatten()
        first = sum(i.n_tokens for i in stats.images if i.sample == img.sample and i.image < img.image)
        pos = pos[first:first + img.n_tokens]
        score = attn[img.sample, :, -1, pos].mean(0)
        k = max(1, math.floor(img.n_tokens * keep / nominal + 0.5))  # round half up, as documented
        expected = sorted(torch.topk(score, k).indices.tolist())
        assert img.kept_index == expected


@register
@dataclass
class _ScaleVisualAttention(Method):
    """Test-only modulator: multiply post-softmax attention to visual keys by ``alpha`` (no renormalisation),
    written out in plain torch from the call's q/k/v and mask."""

    alpha: float = 1.0

    name: ClassVar[str] = "_test_scale_visual"
    description: ClassVar[str] = "test modulator"
    has_budget: ClassVar[bool] = False
    prunes: ClassVar[bool] = False

    def cuts(self, model):
        return ()

    def modulated_layers(self, model):
        return tuple(range(1, model.llm_layers))

    def modulate(self, call):
        groups = call.query.shape[1] // call.key.shape[1]
        k = call.key.repeat_interleave(groups, 1)
        v = call.value.repeat_interleave(groups, 1)
        logits = call.query @ k.transpose(-1, -2) * call.kwargs["scaling"]
        q_len, k_len = call.query.shape[2], call.key.shape[2]
        if call.mask is None:
            allowed = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)[None, None]
        else:
            allowed = call.mask[..., :k_len]
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        probs = probs * torch.where(call.visual, self.alpha, 1.0)[:, None, None, :]
        return (probs @ v).transpose(1, 2), probs


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_attention_stage_hook_runs_on_chosen_layers_only(models, alpha):
    model = models("llava")
    prompt = make_prompt(model, "llava", 4, 0)
    batch = collate([prompt])
    with torch.no_grad():
        ref = model(**batch).logits
        ref_gen = model.generate(**batch, max_new_tokens=4)
    calls = []
    original = _ScaleVisualAttention.modulate

    def spy(self, call):
        calls.append(call.module.layer_idx)
        return original(self, call)

    _ScaleVisualAttention.modulate = spy
    try:
        with vtprune.pruned(model, "_test_scale_visual", alpha=alpha), torch.no_grad():
            out = model(**batch).logits
            gen = model.generate(**batch, max_new_tokens=4)
    finally:
        _ScaleVisualAttention.modulate = original
    assert calls[:3] == [1, 2, 3] and len(calls) == 3 + 3 + 3 * 3  # forward, prefill, 3 decode steps
    if alpha == 1.0:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        assert torch.equal(gen, ref_gen)
    else:
        assert (out - ref).abs().max() > 1e-3
