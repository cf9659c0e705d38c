"""AttentionCall.visual (bug 2): the visual key slots a modulator sees are the slots holding visual tokens in
*that layer's* layout, after any cut, in prefill and decode, checked against a layout rebuilt here from
input_ids and the kept indices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtprune
from vtprune.methods import FastV
from vtprune.methods.base import Method
from vtprune.registry import register

from ..conftest import FAMILIES, collate, make_prompt
from ..helpers import kept_sequence_positions

SEEN: list[tuple[int, int, torch.Tensor]] = []


class _EveryLayerObserver(Method):
    """Base of the test-only modulators below: on every LLM layer, no budget, no cut, changes nothing."""

    has_budget: ClassVar[bool] = False
    prunes: ClassVar[bool] = False

    def cuts(self, model):
        return ()

    def modulated_layers(self, model):
        return tuple(range(model.llm_layers))


@register
@dataclass
class _CaptureVisual(_EveryLayerObserver):
    """Remembers (layer, query length, visual key mask) of every call."""

    name: ClassVar[str] = "_test_capture_visual"
    description: ClassVar[str] = "test: capture AttentionCall.visual"

    def modulate(self, call):
        SEEN.append((call.layer, call.query.shape[2], call.visual.clone()))
        return None


def _expected(batch, stats, image_token: int, after_cut: bool) -> torch.Tensor:
    """[B, T] visual slots: the padded prompt before the cut; after it, each row's surviving tokens (text and kept
    visual; padding is dropped) right-aligned in their original order, as wide as the longest row."""
    ids = batch["input_ids"]
    if not after_cut:
        return ids == image_token
    rows = []
    for b in range(ids.shape[0]):
        imgs = [i for i in stats.images if i.sample == b]
        seq = kept_sequence_positions(ids[b], image_token, [i.kept_index for i in imgs], [i.n_tokens for i in imgs],
                                      batch["attention_mask"][b])
        rows.append(ids[b, seq] == image_token)
    T = max(r.numel() for r in rows)
    return torch.stack([torch.cat([torch.zeros(T - r.numel(), dtype=torch.bool), r]) for r in rows])


@pytest.mark.parametrize("family", FAMILIES)
def test_visual_key_slots_follow_the_layout_of_each_layer(models, family):
    model = models(family)
    batch = collate([make_prompt(model, family, 3 + 4 * i, i) for i in range(2)])
    image_token = model.config.image_token_id
    SEEN.clear()
    with vtprune.pruned(model, [FastV(ratio=0.5, layer=2), _CaptureVisual()]), torch.no_grad():
        model.generate(**batch, max_new_tokens=3, do_sample=False)
        stats = model.vtprune.stats
    kept_visual = [sum(i.kept for i in stats.images if i.sample == b) for b in range(2)]
    n_layers = model.config.text_config.num_hidden_layers
    prefill, decode = SEEN[:n_layers], SEEN[n_layers:]
    assert [layer for layer, _, _ in prefill] == list(range(n_layers)) and len(decode) == 2 * n_layers
    for layer, _, visual in prefill:
        expected = _expected(batch, stats, image_token, after_cut=layer >= 2)
        assert torch.equal(visual, expected), f"layer {layer}"
        if layer >= 2:
            assert visual.sum(1).tolist() == kept_visual  # only slots that really hold visual tokens
    for step, (layer, q, visual) in enumerate(decode):
        expected = _expected(batch, stats, image_token, after_cut=layer >= 2)
        generated = visual.shape[1] - expected.shape[1]
        assert q == 1 and generated == 1 + step // n_layers  # the new tokens so far, this one included
        assert torch.equal(visual[:, : expected.shape[1]], expected) and not visual[:, expected.shape[1]:].any()


ROWS: list[torch.Tensor] = []


@register
@dataclass
class _LastRowProbs(Method):
    """Test-only modulator on LLM layer 1: remembers call.probs of the last query row (prefill), changes nothing."""

    name: ClassVar[str] = "_test_last_row_probs"
    description: ClassVar[str] = "test: AttentionCall.probs"
    has_budget: ClassVar[bool] = False
    prunes: ClassVar[bool] = False

    def cuts(self, model):
        return ()

    def modulated_layers(self, model):
        return (1,)

    def modulate(self, call):
        if call.is_prefill:
            ROWS.append(call.probs(slice(-1, None)))
        return None


@pytest.mark.parametrize("n_prompts", [1, 2])  # one prompt: SDPA passes no mask (causal); two: a padding mask
def test_call_probs_equal_the_eager_attention_rows(models, n_prompts):
    from ..conftest import build_model

    model = models("internvl")
    eager = build_model("internvl", attn="eager")
    eager.load_state_dict(model.state_dict())
    batch = collate([make_prompt(model, "internvl", 3 + 4 * i, i) for i in range(n_prompts)])
    ROWS.clear()
    with torch.no_grad():
        ref = eager(**batch, output_attentions=True).attentions[1][:, :, -1:]
        with vtprune.pruned(model, "_test_last_row_probs"):
            model(**batch)
    (probs,) = ROWS
    torch.testing.assert_close(probs, ref, atol=1e-5, rtol=1e-4)


KEYS: list[tuple[int, torch.Tensor, torch.Tensor]] = []


@register
@dataclass
class _KeysByPosition(_EveryLayerObserver):
    """Keeps the prefill's keys per original position (``to_positions``) and, in each decode step, remembers them
    mapped onto the step's key slots (``from_positions``) with the keys the step really attends to."""

    name: ClassVar[str] = "_test_keys_by_position"
    description: ClassVar[str] = "test: AttentionCall.to_positions / from_positions"

    def modulate(self, call):
        first = call.key[:, 0, :, 0]  # [B, T] one feature of each key slot
        if call.is_prefill:
            call.shared[call.layer] = call.to_positions(first)
        else:
            KEYS.append((call.layer, call.from_positions(call.shared[call.layer]), first.clone(), call.layout.valid))
        return None


@pytest.mark.parametrize("evict", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_scratch_kept_per_original_position_follows_each_layers_cache(models, family, evict):
    """Per-position scratch from the prefill lands, in decode, on the slots of the layout the layer's cache really
    holds: the full one before FastV's cut, or (``evict_early_kv``) the kept tokens only; generated slots get 0."""
    model = models(family)
    batch = collate([make_prompt(model, family, 3 + 4 * i, i) for i in range(2)])
    KEYS.clear()
    with vtprune.pruned(model, [FastV(ratio=0.5, layer=2), _KeysByPosition()], evict_early_kv=evict), torch.no_grad():
        model.generate(**batch, max_new_tokens=3, do_sample=False)
    n_layers = model.config.text_config.num_hidden_layers
    assert len(KEYS) == 2 * n_layers
    full = batch["input_ids"].shape[1]
    for layer, mapped, keys, valid in KEYS:
        prompt = valid.shape[1]
        assert prompt < full if (evict or layer >= 2) else prompt == full  # which layout the cache holds
        assert mapped.shape == keys.shape and not mapped[:, prompt:].any()  # generated tokens: nothing kept
        assert torch.equal(mapped[:, :prompt][valid], keys[:, :prompt][valid]), layer  # each token's own key
        assert not mapped[:, :prompt][~valid].any()
