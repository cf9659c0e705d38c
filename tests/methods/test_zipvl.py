"""ZipVL (spec zipvl.md §1.2-1.5, §1.12) against an independent eager reference written here from the formulas.

The reference runs the eager copy of the tiny model with its own attention function in every LLM layer
(post-RoPE q / k / v come in): per sample, on its valid (unpadded) tokens, the probe rows' fp32 softmax with the
causal mask, averaged over heads; a = column sums; p = the first count whose descending cumulative a reaches
tau of the total; T = the p largest of a / (number of probe rows at or after the key); the output of a row in
T is softmax over the keys in T at or before it, times V; rows outside T are zero. Nothing of vtprune builds it
except ``probe_index`` (the seeded draw of the random probe rows, an input; its own properties are tested).
In decode steps (``evict=True``) the new token attends to T of each layer and the generated tokens only.
"""

from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.errors import ConfigError, PruneError
from vtprune.methods import PAINT
from vtprune.methods.zipvl import ZipVL, probe_index

from ..conftest import FAMILIES, collate, make_prompt
from ..helpers import own_attention

pytestmark = pytest.mark.usefixtures("one_thread")

TAU = 0.9


def probes_of(n, n_recent, n_random, layer, seed=0):
    if n_random == 0:
        return torch.arange(max(n - n_recent, 0), n)  # no draw: the last rows, derived here
    return probe_index(n, n_recent, n_random, seed, layer)


def reference_important(q, k, scaling, probes, tau):
    """q [H, n, d], k [H, n, d] of one sample's valid tokens -> (p, T sorted [p])."""
    n = k.shape[1]
    z = (q[:, probes].double() @ k.double().transpose(-1, -2)) * scaling  # [H, m, n]
    keys = torch.arange(n)
    see = probes[:, None] >= keys[None]
    A = z.masked_fill(~see, float("-inf")).softmax(-1).mean(0)  # [m, n]
    a = A.sum(0)
    running = torch.cumsum(a.sort(descending=True).values, 0)
    p = int(torch.nonzero(running >= tau * a.sum() - 1e-12)[0]) + 1 if tau < 1 else n
    score = a / see.sum(0)
    return p, score.topk(p).indices.sort().values


def zipvl_reference(eager, batch, tau, n_recent, n_random, steps=0, evict=False):
    """(logits [B, T, V], {layer: [p per sample]}, generated tokens [B, steps] or None) of ZipVL on ``eager``."""
    valid = batch["attention_mask"].bool()
    B, L = valid.shape
    kept, important = {}, {}

    def attention(module, q, k, v, mask, scaling):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1).float(), v.repeat_interleave(groups, 1).float()
        layer, Q, T = module.layer_idx, q.shape[2], k.shape[2]
        out = torch.zeros(B, Q, q.shape[1], q.shape[3])
        if Q > 1:
            for b in range(B):
                slots = valid[b].nonzero()[:, 0]
                p, t = reference_important(q[b][:, slots].float(), k[b][:, slots], scaling,
                                           probes_of(len(slots), n_recent, n_random, layer), tau)
                kept.setdefault(layer, []).append(p)
                ts = slots[t]
                important[layer, b] = ts
                z = (q[b][:, ts].float() @ k[b][:, ts].transpose(-1, -2)) * scaling
                z = z.masked_fill(~torch.ones(p, p, dtype=torch.bool).tril(), float("-inf"))
                out[b, ts] = (z.softmax(-1) @ v[b][:, ts]).transpose(0, 1)
        else:  # a decode step: T of the layer (evict) or every valid prompt token, then every generated token
            for b in range(B):
                prompt = important[layer, b] if evict else valid[b].nonzero()[:, 0]
                keys = torch.cat([prompt, torch.arange(L, T)])
                z = (q[b].float() @ k[b][:, keys].transpose(-1, -2)) * scaling
                out[b] = (z.softmax(-1) @ v[b][:, keys]).transpose(0, 1)
        return out.to(q.dtype), None

    with own_attention(eager, attention), torch.no_grad():
        logits = eager(**batch).logits
        tokens = None
        if steps:
            kept.clear()
            tokens = eager.generate(**batch, max_new_tokens=steps, do_sample=False)[:, L:]
    return logits, kept, tokens


def _batch(model, family, seeds):
    return collate([make_prompt(model, family, 3 + 4 * s, s) for s in seeds])


# --- the selection rule, on its own ---------------------------------------------------------------------------
def test_probe_rows_hold_the_recent_ones_and_a_reproducible_draw():
    p = probe_index(200, 64, 64, seed=3, layer=5)
    assert p.tolist() == sorted(set(p.tolist())) and len(p) == 128
    assert p[-64:].tolist() == list(range(136, 200))
    assert torch.equal(p, probe_index(200, 64, 64, seed=3, layer=5))
    assert not torch.equal(p, probe_index(200, 64, 64, seed=3, layer=6))
    assert probe_index(100, 64, 64, 0, 0).tolist() == list(range(100))  # a short prompt: every row
    assert probe_index(50, 64, 64, 0, 0).tolist() == list(range(50))


def test_tau_one_is_bit_identical_to_vanilla(models):
    """p = n in every layer, so each layer runs the model's own attention call unchanged: exactly equal."""
    model = models("llava")
    batch = _batch(model, "llava", [0, 1, 2])
    with torch.no_grad():
        ref = model(**batch).logits
        with vtprune.pruned(model, "zipvl", tau=1.0):
            out = model(**batch).logits
            rep = model.vtprune.stats.reports["zipvl"]
    assert torch.equal(out, ref)
    assert rep.token_ratio == 1.0 and rep.attention_flop_reduction == 0.0


def _run(model, batch, **fields):
    with torch.no_grad(), vtprune.pruned(model, "zipvl", **fields):
        return model(**batch).logits, model.vtprune.stats.reports["zipvl"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("probes", [(16, 0), (8, 8)])
def test_prefill_equals_the_eager_reference_batched_and_alone(models, eager_copy, family, probes):
    """On the eager copy (the method's dense work then goes through the model's eager attention, as the
    reference's does) within 1e-5; on the SDPA model a padded batch of 3 equals each sample alone: the same p in
    every layer, logits within 1e-5 or twice the unpruned model's own batch-vs-alone difference (up to 5e-5 on
    LLaVA-NeXT, from its vision tower). SDPA and eager themselves differ by ~2e-5 here, so that pair is not
    compared."""
    model, eager = models(family), eager_copy(family)
    fields = dict(tau=TAU, n_recent=probes[0], n_random=probes[1])
    batch = _batch(model, family, [0, 1, 2])
    valid = batch["attention_mask"].bool()
    ref, ref_kept, _ = zipvl_reference(eager, batch, TAU, *probes)
    out, rep = _run(eager, batch, **fields)
    assert rep.kept == ref_kept  # p per layer and sample: the minimal count, recomputed above
    assert any(p < n for ps in rep.kept.values() for p, n in zip(ps, rep.tokens))  # something was sparsified
    assert rep.tokens == valid.sum(1).tolist()
    assert all((out[b][valid[b]] - ref[b][valid[b]]).abs().max() <= 1e-5 for b in range(3))
    out, rep = _run(model, batch, **fields)
    with torch.no_grad():
        vanilla = model(**batch).logits
    for b in range(3):
        one = _batch(model, family, [b])
        alone, alone_rep = _run(model, one, **fields)
        with torch.no_grad():  # the unpruned model's own batch-vs-alone difference (its vision tower's batching)
            floor = float((vanilla[b][valid[b]] - model(**one).logits[0]).abs().max())
        assert (out[b][valid[b]] - alone[0]).abs().max() <= max(1e-5, 2 * floor)  # no cross-sample leakage
        assert {layer: ps[b] for layer, ps in rep.kept.items()} == {layer: ps[0] for layer, ps in alone_rep.kept.items()}


def test_report_ratio_and_flops_follow_the_paper_formulas():
    from vtprune.methods.zipvl import ZipVLReport

    # a FastV-like schedule: 2 full layers, 30 at half the tokens -> the paper's 53.1 % "Ratio"
    rep = ZipVLReport(tokens=[100], kept={l: [100 if l < 2 else 50] for l in range(32)})
    assert abs(rep.token_ratio - (2 + 30 * 0.5) / 32) < 1e-12 and round(rep.token_ratio, 3) == 0.531
    assert abs(rep.attention_flop_reduction - (1 - (2 + 30 * 0.25) / 32)) < 1e-12


def test_bad_fields_and_a_modulator_after_it_are_refused(models):
    for bad in (dict(tau=0.0), dict(tau=1.5), dict(n_recent=0), dict(norm="rows"), dict(kv_mode="int4"),
                dict(bits=(3, 2)), dict(recompress_every=0)):
        with pytest.raises(ConfigError):
            ZipVL(**bad)
    model = models("llava")
    with pytest.raises(PruneError, match="list paint before zipvl"):
        vtprune.prune(model, [ZipVL(), PAINT()])
    assert not hasattr(model, "vtprune")


# --- kv_mode="evict" (v2) ----------------------------------------------------------------------------------------
STEPS = 5


@pytest.mark.parametrize("family", FAMILIES)
def test_evict_generate_equals_the_slow_reference(eager_copy, family):
    """Cached decode on per-layer evicted caches == the eager reference, whose full cache masks every prompt token
    outside T_l and keeps the unpruned positions; each layer's cache holds p_l + generated tokens per sample."""
    eager = eager_copy(family)
    batch = _batch(eager, family, [0, 1, 2])
    fields = dict(tau=TAU, n_recent=8, n_random=8)
    _, kept, ref_tokens = zipvl_reference(eager, batch, TAU, 8, 8, steps=STEPS, evict=True)
    with torch.no_grad(), vtprune.pruned(eager, "zipvl", kv_mode="evict", **fields):
        gen = eager.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True)
        rep = eager.vtprune.stats.reports["zipvl"]
    assert torch.equal(gen.sequences[:, batch["input_ids"].shape[1]:], ref_tokens)
    assert rep.kept == kept
    for layer, ps in rep.kept.items():
        store = gen.past_key_values.layers[layer].store
        assert store.valid.sum(1).tolist() == [p + STEPS - 1 for p in ps]  # the last token is never fed back
        assert store.keys.shape[2] == max(ps) + STEPS - 1


def test_evict_batch_of_one_caches_exactly_p_plus_generated(models):
    model = models("llava")
    batch = _batch(model, "llava", [1])
    with torch.no_grad(), vtprune.pruned(model, "zipvl", tau=TAU, kv_mode="evict"):
        gen = model.generate(**batch, max_new_tokens=STEPS, return_dict_in_generate=True)
        rep = model.vtprune.stats.reports["zipvl"]
    cache = gen.past_key_values
    assert [cache.layers[l].keys.shape[2] for l in sorted(rep.kept)] == [ps[0] + STEPS - 1 for _, ps in sorted(rep.kept.items())]
    assert cache.get_seq_length() == batch["input_ids"].shape[1] + STEPS - 1  # positions continue unpruned
    assert any(ps[0] < rep.tokens[0] for ps in rep.kept.values())


@pytest.mark.parametrize("mode", ["none", "evict", "mixed"])
def test_reported_store_size_equals_the_cache_bytes_after_the_prefill(models, mode):
    """The analytic KV bytes `vtprune perf` prints for ZipVL (``report.kv_bytes``) == what the cache holds."""
    from vtprune.perf.timing import kv_cache_bytes

    model = models("llava")
    cfg = model.config.text_config
    kv_heads, head_dim = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    batch = _batch(model, "llava", [1])
    with torch.no_grad(), vtprune.pruned(model, "zipvl", tau=TAU, kv_mode=mode):
        held = kv_cache_bytes(model(**batch, use_cache=True).past_key_values)
        analytic = model.vtprune.stats.reports["zipvl"].kv_bytes(kv_heads, head_dim, 4)
    dense = 2 * kv_heads * head_dim * 4 * batch["input_ids"].shape[1] * cfg.num_hidden_layers
    assert (analytic, held) == (None, dense) if mode == "none" else analytic == held < dense


@pytest.mark.parametrize("mode", ["none", "evict", "mixed"])
def test_beams_sampling_and_a_pre_llm_pruner_before_it(models, mode):
    """generate() with beams and sampling runs on every KV mode; after VisionZip, tau applies to what reaches
    the LLM (n = the tokens left), and a batch equals each prompt alone."""
    model = models("llava")
    prompts = [make_prompt(model, "llava", 3 + 4 * s, s) for s in range(3)]
    pipeline = lambda: [vtprune.methods.VisionZip(keep=12), ZipVL(tau=TAU, kv_mode=mode, recompress_every=2)]
    with torch.no_grad(), vtprune.pruned(model, pipeline()):
        batched = model.generate(**collate(prompts), max_new_tokens=STEPS)[:, -STEPS:]
        rep = model.vtprune.stats.reports["zipvl"]
        assert rep.tokens == [p.input_ids.numel() - 64 + 12 for p in prompts]
        singles = [model.generate(**collate([p]), max_new_tokens=STEPS)[0, -STEPS:] for p in prompts]
        beams = model.generate(**collate(prompts), max_new_tokens=3, num_beams=2)
        torch.manual_seed(0)
        sampled = model.generate(**collate(prompts), max_new_tokens=3, do_sample=True)
    assert batched.tolist() == [s.tolist() for s in singles]
    assert beams.shape[0] == 3 and sampled.shape[0] == 3


# --- kv_mode="mixed" (v1) ----------------------------------------------------------------------------------------
def _prefill(model, batch, **fields):
    """The pruned prefill's cache and its next greedy token, with the session left installed."""
    vtprune.prune(model, "zipvl", tau=TAU, kv_mode="mixed", **fields)
    out = model(**batch, use_cache=True)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


def test_mixed_decode_equals_decode_on_the_same_values_in_a_plain_cache(models):
    from transformers import DynamicCache

    model = models("llava")
    batch = _batch(model, "llava", [2])
    try:
        with torch.no_grad():
            packed, tok = _prefill(model, batch)
            plain = DynamicCache()
            for layer in range(len(packed.layers)):
                plain.update(*packed.layers[layer].store.tensors(), layer)
            assert type(plain.layers[0]).__name__ == "DynamicLayer"
            for _ in range(3):  # the plain cache is unknown to the session: an untouched text-only forward
                a = model(input_ids=tok, cache=packed).logits
                b = model(input_ids=tok, cache=plain).logits
                assert (a - b).abs().max() <= 1e-6
                tok = a[:, -1:].argmax(-1)
            store = packed.layers[0].store
            assert store.pending == 3 and store.exact_k.dtype == torch.float32
    finally:
        vtprune.unprune(model)


def test_recompression_fires_every_interval_and_changes_only_those_rows(models):
    model = models("llava")
    batch = _batch(model, "llava", [0, 1])
    R = 3
    try:
        with torch.no_grad():
            cache, tok = _prefill(model, batch, recompress_every=R)
            n = batch["input_ids"].shape[1]
            stores = [layer.store for layer in cache.layers]
            before = [s.tensors() for s in stores]
            for step in range(1, 2 * R + 2):
                tok = model(input_ids=tok, cache=cache).logits[:, -1:].argmax(-1)
                after = [s.tensors() for s in stores]
                fired = step % R == 0
                for s, (k0, v0), (k1, v1) in zip(stores, before, after):
                    assert s.pending == step % R and len(s.chunks[0]) == 1 + step // R
                    old = n + R * ((step - 1) // R)  # rows packed before this step: unchanged
                    assert torch.equal(k1[:, :, :old], k0[:, :, :old]) and torch.equal(v1[:, :, :old], v0[:, :, :old])
                    if fired:  # the newest R rows: exact before, quantised now
                        assert not torch.equal(k1[:, :, old:], k0[:, :, old:])
                    else:  # tokens since the last compression stay bit-exact
                        assert torch.equal(k1[:, :, old:-1], k0[:, :, old:])
                before = after
    finally:
        vtprune.unprune(model)


def test_recompression_at_the_paper_interval_of_100(models):
    model = models("llava")
    batch = _batch(model, "llava", [0])
    with torch.no_grad(), vtprune.pruned(model, "zipvl", tau=TAU, kv_mode="mixed"):
        gen = model.generate(**batch, max_new_tokens=100, return_dict_in_generate=True)
        store = gen.past_key_values.layers[0].store
        assert store.pending == 99 and len(store.chunks[0]) == 1  # 99 generated tokens cached so far
        gen = model.generate(**batch, max_new_tokens=101, return_dict_in_generate=True)
        store = gen.past_key_values.layers[0].store
        assert store.pending == 0 and len(store.chunks[0]) == 2 and store.chunks[0][1].n == 100


def test_output_attentions_are_the_sparse_probabilities(eager_copy):
    """Eager attention with attention outputs: rows in T sum to 1 over keys in T, rows outside T are zero."""
    eager = eager_copy("llava")
    batch = _batch(eager, "llava", [0, 1])
    with torch.no_grad(), vtprune.pruned(eager, "zipvl", tau=TAU, n_recent=8, n_random=8):
        attentions = eager(**batch, output_attentions=True).attentions
        rep = eager.vtprune.stats.reports["zipvl"]
    for layer, ps in rep.kept.items():
        rows = attentions[layer].sum(-1)  # [B, H, T]
        assert ((rows - 1).abs() < 1e-5).sum(-1)[:, 0].tolist() == ps  # p rows attend, the others are zero
        assert ((rows == 0) | ((rows - 1).abs() < 1e-5)).all()


def test_a_kv_mode_with_evict_early_kv_is_refused_at_prune(models):
    model = models("llava")
    with pytest.raises(PruneError, match="evict_early_kv"):
        vtprune.prune(model, [ZipVL(kv_mode="mixed"), vtprune.methods.FastV(ratio=0.5)], evict_early_kv=True)
    assert not hasattr(model, "vtprune")
    with vtprune.pruned(model, [ZipVL(), vtprune.methods.FastV(ratio=0.5)], evict_early_kv=True):
        pass  # kv_mode "none" keeps the default cache


def test_normalisation_modes_on_a_six_token_toy():
    """Probe rows 3, 4, 5 of uniform causal attention: raw column sums favour early keys; dividing by the probe rows
    that see each key (probe_nnz) or by n - j (full_causal, ZipCache) shrinks that bias (spec §1.12 item 2)."""
    from vtprune.methods.zipvl import column_scores

    probes = torch.tensor([3, 4, 5])
    probs = torch.tensor([[1 / 4] * 4 + [0, 0], [1 / 5] * 5 + [0], [1 / 6] * 6])
    a = torch.tensor([1 / 4 + 1 / 5 + 1 / 6] * 4 + [1 / 5 + 1 / 6, 1 / 6])
    for norm, cnt in (("probe_nnz", [3, 3, 3, 3, 2, 1]), ("full_causal", [6, 5, 4, 3, 2, 1]), ("none", [1] * 6)):
        mass, score = column_scores(probs, probes, norm)
        assert torch.allclose(mass, a) and torch.allclose(score, a / torch.tensor(cnt, dtype=torch.float))


def test_force_last_puts_the_last_prompt_token_in_every_layers_set(eager_copy):
    eager = eager_copy("llava")
    batch = _batch(eager, "llava", [0])
    for force, expect in ((True, True), (False, None)):
        with torch.no_grad(), vtprune.pruned(eager, "zipvl", tau=0.5, n_recent=8, n_random=8, force_last=force):
            attentions = eager(**batch, output_attentions=True).attentions
        last_rows = [bool(a[0, 0, -1].sum() > 0.5) for a in attentions]
        assert all(last_rows) if expect else not all(last_rows)  # tau 0.5 leaves it out somewhere unless forced
