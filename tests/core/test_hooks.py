"""Attention chains: one layer recorded and modulated at once (bug 1: one hook slot lost the recorder), chain
order, and exact removal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtprune
from vtprune.core.hooks import AttentionChain
from vtprune.core.probes import LLMAttention
from vtprune.methods.base import Cut, Method
from vtprune.registry import register

from ..conftest import build_model, collate, make_prompt
from ..helpers import kept_sequence_positions, merged_embeds

CALLS: list[int] = []


@register
@dataclass
class _RecordAndModulate(Method):
    """Test-only: scores at LLM layer 1 (cut before layer 2) and adds ``beta`` to layer 1's logits of visual keys."""

    beta: float = 0.0

    name: ClassVar[str] = "_test_record_and_modulate"
    description: ClassVar[str] = "test: record + modulate one layer"

    def cuts(self, model):
        return (Cut("llm", 2),)

    def probes(self, model):
        return (LLMAttention(1),)

    def modulated_layers(self, model):
        return (1,)

    def score(self, image):
        return image[LLMAttention(1)].mean(0)

    def modulate(self, call):
        CALLS.append(call.layer)
        return call.run(bias=torch.where(call.visual, self.beta, 0.0)[:, None, None, :])


def _reference(eager, batch, kept, beta: float):
    """Last-token logits written out layer by layer: layer 1 adds ``beta`` to every query's logits of visual keys,
    layers >= 2 see only the kept tokens at their original positions (one sample, no padding)."""
    lm = eager.model.language_model
    ids = batch["input_ids"][0]
    h = merged_embeds(eager, batch)
    T = h.shape[1]
    pos = torch.arange(T)[None]
    cos, sin = lm.rotary_emb(h, position_ids=pos)
    causal = torch.full((T, T), float("-inf")).triu(1)
    visual = ids == eager.config.image_token_id
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            if i == 2:
                h, cos, sin, pos, causal = h[:, kept], cos[:, kept], sin[:, kept], pos[:, kept], causal[kept][:, kept]
            mask = causal + (torch.where(visual, beta, 0.0)[None] if i == 1 else 0.0)
            out = layer(h, attention_mask=mask[None, None], position_embeddings=(cos, sin), position_ids=pos)
            h = out[0] if isinstance(out, tuple) else out
        return eager.lm_head(lm.norm(h))[:, -1]


@pytest.mark.parametrize("beta", [0.0, -3.0])
def test_a_method_records_and_modulates_the_same_layer(models, beta):
    model = models("llava")
    eager = build_model("llava", attn="eager")
    eager.load_state_dict(model.state_dict())
    batch = collate([make_prompt(model, "llava", 5, 0)])
    with torch.no_grad():
        attn = eager(**batch, output_attentions=True).attentions[1]
    CALLS.clear()
    with vtprune.pruned(model, "_test_record_and_modulate", keep=16, beta=beta), torch.no_grad():
        logits = model(**batch).logits[:, -1]
        img = model.vtprune.stats.images[0]
    assert CALLS == [1]  # the modulator ran, and the recorder before it (the kept set below)
    ids = batch["input_ids"][0]
    pos = torch.nonzero(ids == model.config.image_token_id).flatten()
    # the recorder sits before the modulator in the chain: it sees the unmodulated attention
    assert img.kept_index == sorted(torch.topk(attn[0, :, -1, pos].mean(0), 16).indices.tolist())
    kept = kept_sequence_positions(ids, model.config.image_token_id, [img.kept_index], [img.n_tokens])
    torch.testing.assert_close(logits, _reference(eager, batch, kept, beta), atol=1e-4, rtol=1e-4)
    assert not any("_vtprune_attention" in m.__dict__ for m in model.modules())


def test_chain_runs_recorders_before_modulators_before_the_model():
    order = []

    def recorder(tag):
        def fn(next, module, *args, **kwargs):
            order.append(tag)
            return next(module, *args, **kwargs)
        return fn

    def modulator(next, module, x, **kwargs):
        order.append("modulate")
        return next(module, x * 2, **kwargs)

    chain = AttentionChain()
    chain.add(modulator, "modulate")
    chain.add(recorder("record a"), "record")
    chain.add(recorder("record b"), "record")
    out = chain(lambda module, x, **kwargs: (order.append("model"), x + 1)[1], None, 3)
    assert order == ["record a", "record b", "modulate", "model"] and out == 7


def test_ratio_zero_installs_no_chain_and_logits_are_bit_identical(models):
    model = models("llava")
    batch = collate([make_prompt(model, "llava", 4, 1)])
    with torch.no_grad():
        ref = model(**batch).logits
        with vtprune.pruned(model, "_test_record_and_modulate", ratio=0.0, beta=-3.0):
            assert not any("_vtprune_attention" in m.__dict__ for m in model.modules())
            same = model(**batch).logits
    assert torch.equal(ref, same)
