"""FlowCut (spec §1): entropy schedule, and the kept set against a from-the-formula recomputation of the ViT."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import vtprune
from vtprune.methods.flowcut import flowcut_prune_count

from ..conftest import collate, make_prompt


def _constant_entropy_attention(n: int, rho: float) -> torch.Tensor:
    """An attention vector over n patches whose normalised entropy is ``rho`` (two-level distribution)."""
    lo, hi = 1e-9, 1.0
    for _ in range(200):  # bisection on the temperature of a geometric profile
        t = (lo + hi) / 2
        p = torch.exp(-torch.arange(n, dtype=torch.float64) * t)
        p = p / p.sum()
        h = float(-(p * torch.log(p)).sum()) / math.log(n)
        lo, hi = (t, hi) if h > rho else (lo, t)
    return p


@pytest.mark.parametrize("rho", [0.95, 0.8, 0.5])
def test_prune_count_follows_entropy_schedule_and_ends_at_target(rho):
    n, target, s = 576, 64, 22
    history = []
    for layer in range(s):  # prune the output of layer l when r = s - l - 1 is even
        r = s - layer - 1
        if r % 2:
            continue
        attn = _constant_entropy_attention(n, rho)
        p = attn / attn.sum()
        h = float(-(p * torch.log(p + 1e-7)).sum()) / math.log(n)
        expected = n - target if r == 0 else round((n - target) / math.sqrt(r) * (1 - h**2))
        count = flowcut_prune_count(attn, target, r)
        assert count == expected
        n = max(n - count, target)
        history.append(n)
    assert history[-1] == target
    assert all(a >= b for a, b in zip(history, history[1:]))
    if rho == 0.95:
        assert history[0] > 540  # high entropy: small early steps (spec's illustration: 565 after l=1)


def test_uniform_attention_prunes_nothing_until_the_forced_cut():
    attn = torch.full((100,), 0.01)
    assert flowcut_prune_count(attn, 10, 4) == 0
    assert flowcut_prune_count(attn, 10, 0) == 90


def _deep_llava():
    """LLaVA with a 6-layer CLIP: feature layer s = 4, FlowCut cuts the outputs of layers 1 and 3."""
    torch.manual_seed(1)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2,
                          image_size=32, patch_size=4)
    tc = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=100, image_seq_length=64,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg._attn_implementation = cfg.text_config._attn_implementation = cfg.vision_config._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(copy.deepcopy(cfg)).eval()


def _reference_flowcut(model, pixel_values, target, shared=True, scaling="none"):
    """FlowCut's ViT stage written out from the spec formulas (eager math, one crop at a time)."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    s = len(layers) - 2
    with torch.no_grad():
        h = tower.pre_layrnorm(tower.embeddings(pixel_values))
        B = h.shape[0]
        index = [torch.arange(64) for _ in range(B)]
        cum = [None] * B
        counts_log = []
        for layer_idx in range(s):
            layer = layers[layer_idx]
            attn_mod = layer.self_attn
            heads, d = attn_mod.num_heads, attn_mod.head_dim
            x = layer.layer_norm1(h)
            q = attn_mod.q_proj(x).view(B, -1, heads, d).transpose(1, 2)
            k = attn_mod.k_proj(x).view(B, -1, heads, d).transpose(1, 2)
            v = attn_mod.v_proj(x).view(B, -1, heads, d).transpose(1, 2)
            probs = ((q @ k.transpose(-1, -2)) * attn_mod.scale).softmax(-1)
            attn_last = []
            for b in range(B):
                a = probs[b, :, 0, 1:].mean(0)
                sem_logits = v[b, :, :1] @ v[b].transpose(-1, -2)
                if scaling == "sqrt_d":
                    sem_logits = sem_logits / math.sqrt(d)
                sem = sem_logits.softmax(-1).mean(0)[0, 1:]
                score = (a / a.sum() + sem / sem.sum()) * v[b].mean(0)[1:].abs().sum(-1)
                cum[b] = score if cum[b] is None else 0.5 * cum[b] + 0.5 * score
                attn_last.append(a)
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
            r = s - layer_idx - 1
            if r % 2 == 0:
                n = h.shape[1] - 1
                prune = [n - target if r == 0 else round((n - target) / math.sqrt(r) * (1 - (
                    float(-((a / a.sum()) * torch.log(a / a.sum() + 1e-7)).sum()) / math.log(n)) ** 2))
                    for a in attn_last]
                if shared:
                    prune = [max(prune)] * B
                keeps = [torch.sort(torch.topk(cum[b], max(n - prune[b], target)).indices).values for b in range(B)]
                assert len({k.numel() for k in keeps}) == 1, "reference handles equal counts only"
                h = torch.stack([torch.cat([h[b, :1], h[b, 1:][keeps[b]]]) for b in range(B)])
                index = [index[b][keeps[b]] for b in range(B)]
                cum = [cum[b][keeps[b]] for b in range(B)]
                counts_log.append(keeps[0].numel())
    return [i.tolist() for i in index], counts_log


@pytest.mark.parametrize("keep", [8, 20])
@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("scaling", ["none", "sqrt_d"])
def test_flowcut_kept_set_matches_formula(keep, batch_size, scaling):
    model = _deep_llava()
    prompts = [make_prompt(model, "llava", 3 + i, 10 + i) for i in range(batch_size)]
    batch = collate(prompts)
    expected, counts = _reference_flowcut(model, batch["pixel_values"], keep, shared=True, scaling=scaling)
    with vtprune.pruned(model, "flowcut", keep=keep, semantic_scaling=scaling), torch.no_grad():
        out = model(**batch)
        stats = model.vtprune.stats
    assert model.config.vision_config._attn_implementation == "sdpa"
    for img in stats.images:
        assert img.kept_index == expected[img.image]
        assert [st.tokens_out for st in img.stages if st.stage == "vision"] == counts
        assert [st.layer for st in img.stages if st.stage == "vision"] == [2, 4]
        assert img.kept == keep
    assert out.logits.shape[1] == batch["input_ids"].shape[1] - (64 - keep)


def test_flowcut_per_sample_counts_equal_single_runs():
    model = _deep_llava()
    prompts = [make_prompt(model, "llava", 3 + i, 20 + i) for i in range(3)]
    with vtprune.pruned(model, "flowcut", keep=10, shared_prune_count=False), torch.no_grad():
        model(**collate(prompts))
        batched = [(img.kept_index, [s.tokens_out for s in img.stages]) for img in model.vtprune.stats.images]
        singles = []
        for p in prompts:
            model(**collate([p]))
            img = model.vtprune.stats.images[0]
            singles.append((img.kept_index, [s.tokens_out for s in img.stages]))
    assert batched == singles
