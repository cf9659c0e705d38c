"""DART (spec §2.8): pivots, quotas and the kept set against a reference computed here from an unpruned eager
forward (layer K-1's post-RoPE keys and final-normed outputs), in both count modes and both pivot orders; the
pruned forward against a layer-by-layer reference with original positions; cache lengths per layer."""

from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.errors import ConfigError

from ..conftest import build_model, collate, make_prompt
from ..helpers import image_positions, kept_sequence_positions, merged_embeds, own_attention, slow_in_llm_generate

K, P_IMG, P_TXT, BUDGET = 2, 2, 2, 8


@pytest.fixture(scope="module")
def pair():
    """(sdpa, eager) tiny LLaVA with random RMSNorm weights: with the init's unit weights the final norm would
    not change a cosine, and a method skipping it would pass."""
    model = build_model("llava")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))) * 2)
    eager = build_model("llava", attn="eager")
    eager.load_state_dict(model.state_dict())
    return model, eager


def _unpruned_states(eager, batch):
    """(keys [T, H_kv * d] of layer K-1 after RoPE, final-normed outputs [T, D] of layer K-1), float64."""
    seen = {}
    target = eager.model.language_model.layers[K - 1].self_attn

    def attention(module, q, k, v, mask, scaling):
        if module is target:
            seen["keys"] = k[0].transpose(0, 1).reshape(k.shape[2], -1).double()  # [T, H_kv * d]
        w = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)) * scaling + mask[..., :k.shape[2]]
        out = w.softmax(-1) @ v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        return out.transpose(1, 2), None

    with own_attention(eager, attention), torch.no_grad():
        out = eager(**batch, output_hidden_states=True)
    h = out.hidden_states[K][0]  # entry K: what layer K-1 outputs
    with torch.no_grad():
        return seen["keys"], eager.model.language_model.norm(h).double()


def _reference(eager, batch, count, order):
    """Spec §2.2 written out: L1 key norms -> pivots; per pivot the least-cosine pool tokens; quotas by ``count``."""
    keys, h = _unpruned_states(eager, batch)
    ids = batch["input_ids"][0]
    img = image_positions(ids, eager.config.image_token_id)
    text = torch.arange(int(img[-1]) + 1, ids.numel())
    norm = keys.abs().sum(-1)
    img_piv = sorted(img.tolist(), key=lambda p: -float(norm[p]))[:P_IMG]
    txt_piv = sorted(text.tolist(), key=lambda p: -float(norm[p]))[:P_TXT]
    visit = img_piv + txt_piv if order == "norm" else list(set(img_piv + txt_piv))
    if count == "official":
        quotas = [BUDGET // (P_IMG + P_TXT)] * 4
    else:
        rest = BUDGET - P_IMG
        quotas = [rest // 4 + (i < rest % 4) for i in range(4)]
    pool, kept, first_picks = [p for p in img.tolist() if p not in img_piv], list(img_piv), None
    for pivot, quota in zip(visit, quotas):
        cos = {p: float(h[pivot] @ h[p] / (h[pivot].norm() * h[p].norm())) for p in pool}
        picks = sorted(pool, key=lambda p: (cos[p], p))[:quota]
        first_picks = picks if first_picks is None else first_picks
        kept += picks
        pool = [p for p in pool if p not in picks]
    start = int(img[0])
    return sorted(p - start for p in kept), [p - start for p in img_piv]


@pytest.mark.parametrize("count,order", [("exact", "norm"), ("official", "norm"), ("exact", "official"),
                                         ("official", "official")])
def test_kept_set_equals_the_eager_reference(pair, count, order):
    model, eager = pair
    batch = collate([make_prompt(model, "llava", 6, 3)])
    expected, img_pivots = _reference(eager, batch, count, order)
    with vtprune.pruned(model, "dart", keep=BUDGET, layer=K, pivot_image=P_IMG, pivot_text=P_TXT, count=count,
                        pivot_order=order), torch.no_grad():
        model(**batch)
        stats = model.vtprune.stats.images[0]
    assert stats.kept_index == expected
    assert set(img_pivots) <= set(expected)
    assert stats.kept == (BUDGET if count == "exact" else P_IMG + 4 * (BUDGET // 4))


def test_the_two_pivot_orders_differ_somewhere(pair):
    """The official (set) order is not the norm order on at least one prompt, in vtprune as in the reference (else
    the order test above would be void)."""
    model, eager = pair
    differ = []
    for s in range(4):
        batch = collate([make_prompt(model, "llava", 6, s)])
        kept = []
        for order in ("norm", "official"):
            with vtprune.pruned(model, "dart", keep=BUDGET, layer=K, pivot_image=P_IMG, pivot_text=P_TXT,
                                pivot_order=order), torch.no_grad():
                model(**batch)
                kept.append(model.vtprune.stats.images[0].kept_index)
        assert kept[1] == _reference(eager, batch, "exact", "official")[0]
        differ.append(kept[0] != kept[1])
        if differ[-1]:
            break
    assert any(differ)


def test_logits_and_cache_equal_the_layer_by_layer_reference(pair):
    model = pair[0]
    prompt = make_prompt(model, "llava", 5, 1)
    batch = collate([prompt])
    T = prompt.input_ids.numel()
    with vtprune.pruned(model, "dart", keep=BUDGET, layer=K, pivot_image=P_IMG, pivot_text=P_TXT):
        with torch.no_grad():
            out = model(**batch, use_cache=True)
            tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)[0, -4:].tolist()
        stats = model.vtprune.stats.images[0]
    lengths = [layer.keys.shape[-2] for layer in out.cache.layers]
    assert lengths == [T] * K + [T - (stats.n_tokens - BUDGET)] * (len(lengths) - K)
    keep = kept_sequence_positions(batch["input_ids"][0], model.config.image_token_id, [stats.kept_index],
                                   [stats.n_tokens])
    ref_tokens, ref_logits = slow_in_llm_generate(model, merged_embeds(model, batch), keep, K, 4)
    torch.testing.assert_close(out.logits[:, -1], ref_logits, atol=1e-5, rtol=0)
    assert tokens == ref_tokens


def test_bad_fields_are_refused():
    for field, value in (("count", "approx"), ("pivot_order", "set"), ("layer", 0), ("pivot_image", 0)):
        with pytest.raises(ConfigError, match=f"dart {field}={value!r} is out of range"):
            vtprune.method("dart", keep=8, **{field: value})
