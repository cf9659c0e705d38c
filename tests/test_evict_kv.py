"""``evict_early_kv=True``: after the prefill every LLM layer's KV cache holds only the text tokens and the visual
tokens of the pipeline's last cut, and decode runs on that cache. References are built here by hand from a run
without eviction (index_select of the kept rows) and an unpruned model decoding step by step."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import DynamicCache

import vtprune
from vtprune.errors import ConfigError

from .conftest import FAMILIES, IMAGE_TOKEN
from .helpers import batch_of

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 5
FASTV_RATIO = 0.75
TRANSPRUNE_RATIOS = (0.875, 0.625, 0.125)  # TransPrune's default schedule; 4 LLM layers: cuts before 1, 2, 3
METHODS = {"fastv": dict(ratio=FASTV_RATIO), "transprune": {}}
RENUMBERS = {"fastv": False, "transprune": True}  # decode positions continue after the kept prompt (TransPrune)
BATCHES = {"one": [1], "two": [0, 1]}  # seeds of batch_of's prompts (text lengths 3 + 4 * seed, left padded)


def _kept_visual(method: str, n: int) -> int:
    """Visual tokens an image of n tokens keeps after the method's last cut, from the paper formulas."""
    if method == "fastv":
        return max(1, min(n, round(n * (1 - FASTV_RATIO))))
    return max(1, int(n * TRANSPRUNE_RATIOS[-1]))  # non-increasing ratios of N: the last one decides


def _expected_length(method: str, batch) -> int:
    """Cache length once evicted: the longest remaining row, its text (left padding excluded: a cut drops it) plus
    its kept visual tokens."""
    lengths = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        image = ids == IMAGE_TOKEN  # one image per prompt of batch_of
        lengths.append(int((mask.bool() & ~image).sum()) + _kept_visual(method, int(image.sum())))
    return max(lengths)


def _present(ids, mask, kept: list[int] | None) -> torch.Tensor:
    """Sorted original positions of the valid tokens of a row present in a layer: every text token and the image's
    tokens with indices ``kept`` (None: all)."""
    image_pos = torch.nonzero(ids == IMAGE_TOKEN).flatten()
    present = mask.bool() & (ids != IMAGE_TOKEN)
    present[image_pos if kept is None else image_pos[torch.tensor(kept, dtype=torch.long)]] = True
    return torch.nonzero(present).flatten()


def _kept_at(stats, sample: int, layer: int) -> list[int] | None:
    """Kept indices of the sample's image in decoder ``layer``: after the last LLM stage cutting at or before it."""
    (img,) = [i for i in stats.images if i.sample == sample]
    stages = [st for st in img.stages if st.stage == "llm" and st.layer <= layer]
    return stages[-1].kept_index if stages else None


def _rows(cache_len: int, present: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Slots of a right-aligned cache of ``cache_len`` holding ``present`` (sorted positions) where ``wanted`` sit."""
    return cache_len - present.numel() + torch.searchsorted(present, wanted)


def _prefill(model, batch, method, **options):
    with torch.no_grad(), vtprune.pruned(model, method, **METHODS[method], **options):
        out = model(**batch, use_cache=True)
        return out, model.vtprune.stats


@pytest.mark.parametrize("shape", sorted(BATCHES))
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_evicted_cache_holds_the_final_kept_rows_of_every_layer(models, family, method, shape):
    model = models(family)
    batch = batch_of(model, family, BATCHES[shape])
    full, stats = _prefill(model, batch, method)
    evicted, ev_stats = _prefill(model, batch, method, evict_early_kv=True)
    assert ev_stats.evicted_early_kv and not stats.evicted_early_kv
    T = _expected_length(method, batch)
    n_layers = len(full.cache.layers)
    last_cut = max(st.layer for img in stats.images for st in img.stages if st.stage == "llm")
    for layer, (f, e) in enumerate(zip(full.cache.layers, evicted.cache.layers)):
        assert e.keys.shape[2] == e.values.shape[2] == T, layer
        if layer >= last_cut:  # the last segment: untouched
            assert torch.equal(e.keys, f.keys) and torch.equal(e.values, f.values)
        for b, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
            final = _present(ids, mask, _kept_at(stats, b, n_layers - 1))
            src = _rows(f.keys.shape[2], _present(ids, mask, _kept_at(stats, b, layer)), final)
            dst = torch.arange(T - final.numel(), T)
            assert torch.equal(e.keys[b][:, dst], f.keys[b][:, src]), (layer, b)
            assert torch.equal(e.values[b][:, dst], f.values[b][:, src]), (layer, b)
    assert full.cache.layers[0].keys.shape[2] == batch["input_ids"].shape[1]  # the default keeps layer 0 whole
    assert torch.equal(evicted.logits, full.logits)  # the prefill itself is the same


def _reduced_cache(full_cache, ids, stats, n_layers: int):
    """A one-sample DynamicCache with only the final kept rows of every layer (index_select from a full run)."""
    mask = torch.ones_like(ids)
    final = _present(ids, mask, _kept_at(stats, 0, n_layers - 1))
    cache = DynamicCache()
    for layer, f in enumerate(full_cache.layers):
        rows = _rows(f.keys.shape[2], _present(ids, mask, _kept_at(stats, 0, layer)), final)
        cache.update(f.keys.index_select(2, rows), f.values.index_select(2, rows), layer)
    return cache, final.numel()


def _slow_evicted_decode(model, prompt_batch, method):
    """Greedy tokens and per-step logits of one prompt: the prefill of a run without eviction, then every step on
    the hand-reduced cache with the unpruned model, an explicit mask and explicit positions."""
    out, stats = _prefill(model, prompt_batch, method)  # unpruned again on return
    ids = prompt_batch["input_ids"][0]
    cache, n_kept = _reduced_cache(out.cache, ids, stats, model.config.text_config.num_hidden_layers)
    start = n_kept if RENUMBERS[method] else ids.numel()  # position of the first generated token
    logits = [out.logits[0, -1]]
    tok = logits[0].argmax().view(1, 1)
    tokens = [int(tok)]
    with torch.no_grad():
        for t in range(STEPS - 1):
            step = model(input_ids=tok, cache=cache, position_ids=torch.tensor([[start + t]]),
                         attention_mask=torch.ones(1, n_kept + t + 1, dtype=torch.long), use_cache=True)
            cache, tok = step.cache, step.logits[:, -1].argmax(-1, keepdim=True)
            logits.append(step.logits[0, -1])
            tokens.append(int(tok))
    return tokens, torch.stack(logits)


def _generate(model, batch, method, **options):
    with torch.no_grad(), vtprune.pruned(model, method, **METHODS[method], **options):
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    return out.sequences[:, -STEPS:], torch.stack(out.logits, 1)  # [B, STEPS], [B, STEPS, V]


@pytest.mark.parametrize("shape", sorted(BATCHES))
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_decode_on_the_evicted_cache_equals_the_slow_reference(models, family, method, shape):
    model = models(family)
    seeds = BATCHES[shape]
    tokens, logits = _generate(model, batch_of(model, family, seeds), method, evict_early_kv=True)
    for b, seed in enumerate(seeds):  # the batched run against each prompt alone
        ref_tokens, ref_logits = _slow_evicted_decode(model, batch_of(model, family, [seed]), method)
        assert tokens[b].tolist() == ref_tokens, (b, seed)
        torch.testing.assert_close(logits[b], ref_logits, atol=1e-4, rtol=1e-4)
    # the reference can tell: without eviction the decode steps see other caches and give other logits
    _, default_logits = _generate(model, batch_of(model, family, seeds), method)
    assert not torch.allclose(default_logits[:, 1:], logits[:, 1:], atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_and_explicit_false_are_todays_run(models, family):
    model = models(family)
    batch = batch_of(model, family, [0, 1])
    tokens, logits = _generate(model, batch, "fastv")
    tokens_false, logits_false = _generate(model, batch, "fastv", evict_early_kv=False)
    assert torch.equal(tokens, tokens_false) and torch.equal(logits, logits_false)
    out, stats = _prefill(model, batch, "fastv", evict_early_kv=False)
    assert not stats.evicted_early_kv
    assert out.cache.layers[0].keys.shape[2] == batch["input_ids"].shape[1]


@pytest.mark.parametrize("method, kwargs", [("visionzip", dict(keep=12)), ("random", dict(ratio=0.6, seed=0))])
def test_pre_llm_only_methods_keep_the_same_cache(models, method, kwargs):
    model = models("llava")
    batch = batch_of(model, "llava", [0, 1])
    caches = []
    for options in ({}, {"evict_early_kv": True}):
        with torch.no_grad(), vtprune.pruned(model, method, **kwargs, **options):
            caches.append(model(**batch, use_cache=True).cache)
            assert not model.vtprune.stats.evicted_early_kv
    for plain, evicting in zip(*(c.layers for c in caches)):
        assert torch.equal(plain.keys, evicting.keys) and torch.equal(plain.values, evicting.values)


@pytest.mark.parametrize("value", ["yes", 1, 0.0, [True]])
def test_non_bool_is_a_config_error_naming_the_option(models, value):
    model = models("llava")
    with pytest.raises(ConfigError, match="evict_early_kv"):
        vtprune.prune(model, "fastv", ratio=0.5, evict_early_kv=value)
    assert not hasattr(model, "vtprune")


def _write(tmp_path, data) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("data", [
    {"method": "fastv", "ratio": 0.5, "evict_early_kv": True},
    {"pipeline": [{"method": "visionzip", "keep": 32}, {"method": "fastv", "ratio": 0.5}], "evict_early_kv": True},
])
def test_config_key_turns_it_on_and_the_keyword_overrides(models, tmp_path, data):
    model = models("llava")
    path = _write(tmp_path, data)
    assert vtprune.load_config(path)["evict_early_kv"] is True
    with vtprune.pruned(model, config=path):
        assert model.vtprune.evict_early_kv
        with torch.no_grad():
            model(**batch_of(model, "llava", [0]), use_cache=True)
        assert model.vtprune.stats.evicted_early_kv
    with vtprune.pruned(model, config=path, evict_early_kv=False):
        assert not model.vtprune.evict_early_kv


@pytest.mark.parametrize("data", [
    {"method": "fastv", "ratio": 0.5, "evict_early_kv": "on"},
    {"pipeline": [{"method": "fastv", "ratio": 0.5}], "evict_early_kv": 1},
])
def test_config_with_a_non_bool_is_refused_before_a_model(tmp_path, data):
    with pytest.raises(ConfigError, match=r"evict_early_kv.*line \d"):
        vtprune.load_config(_write(tmp_path, data))


# --- a modulator after the cuts (issue 23 item 7) ------------------------------------------------------------------
VAR_CFG = dict(sink_dims=(17, 31), tau=2.5, rho=0.5, min_image_mass=0.3, p=0.4, layers=(1, 2))  # tiny LLaVA: sinks
VAR_CUT = 3  # FastV's cut: VAR's layers are before it, so their caches are evicted
MARGIN = 1e-4


def _var_pipeline(first: str):
    from vtprune.methods import VAR

    firsts = {"fastv": lambda: vtprune.method("fastv", ratio=0.5, layer=VAR_CUT),
              "transprune": lambda: vtprune.method("transprune"),
              "vflowopt": lambda: vtprune.method("vflowopt", ratio=0.5)}
    return [firsts[first](), VAR(**VAR_CFG)]


def _var_generate(model, batch, first: str):
    with torch.no_grad(), vtprune.pruned(model, _var_pipeline(first), evict_early_kv=True):
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        assert model.vtprune.stats.evicted_early_kv
    return out.sequences[:, -STEPS:], torch.stack(out.logits, 1)


def _var_step_attention(sinks: dict, visual: torch.Tensor, decisions: list):
    """The eager attention of a decode step with VAR's edit (spec §1.3) on layers ``sinks``: sinks and visual keys
    are the present prompt tokens' (generated tokens are neither), the query is the new token (after the image)."""
    from .methods.test_var import eager_probs

    def attention(module, q, k, v, mask, scaling):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1).float()
        A = eager_probs(q, k, mask, scaling)
        if module.layer_idx in sinks:
            extra = A.shape[-1] - visual.numel()
            sink = torch.cat([sinks[module.layer_idx], torch.zeros(extra, dtype=torch.bool)])
            vis = torch.cat([visual, torch.zeros(extra, dtype=torch.bool)])
            rest = vis & ~sink
            a_img, a, s = (A * vis).sum(-1), (A * rest).sum(-1), (A * sink).sum(-1)  # [1, H, 1]
            selected = (a_img >= VAR_CFG["min_image_mass"]) & (a / a_img >= VAR_CFG["rho"]) & bool((sink & vis).any())
            edited = torch.where(sink, (1 - VAR_CFG["p"]) * A, torch.where(rest, A + VAR_CFG["p"] * s[..., None] * A
                                                                          / a[..., None], A))
            decisions.append(dict(a_img=a_img, ratio=a / a_img, selected=selected))
            A = torch.where(selected[..., None], edited, A)
        return (A @ v).to(q.dtype).transpose(1, 2).contiguous(), A

    return attention


def _var_evicted_reference(model, eager, prompt_batch):
    """One prompt of [FastV(layer 3), VAR] with eviction: the prefill of a run without eviction (the residual
    entering VAR's layers captured there), its cache cut by hand to the final kept rows, then eager decode steps
    applying VAR on the tokens present. Returns (tokens, per-step logits, decisions, sinks, visual)."""
    from .helpers import own_attention
    from .methods.test_var import phi

    lm, ids = model.model.language_model, prompt_batch["input_ids"][0]
    residual = {}

    def capture(layer):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            residual.setdefault(layer, hidden[0].clone())  # the prefill's, what the layer got from vtprune
        return hook

    handles = [lm.layers[l].register_forward_pre_hook(capture(l), with_kwargs=True) for l in VAR_CFG["layers"]]
    try:
        with torch.no_grad(), vtprune.pruned(model, _var_pipeline("fastv")):
            out = model(**prompt_batch, use_cache=True)
            stats = model.vtprune.stats
    finally:
        for h in handles:
            h.remove()
    n_layers = model.config.text_config.num_hidden_layers
    cache, n_kept = _reduced_cache(out.cache, ids, stats, n_layers)
    present = _present(ids, torch.ones_like(ids), _kept_at(stats, 0, n_layers - 1))
    phis = {l: phi(residual[l][present], VAR_CFG["sink_dims"]) for l in VAR_CFG["layers"]}
    sinks = {l: p > VAR_CFG["tau"] for l, p in phis.items()}
    visual = ids[present] == IMAGE_TOKEN
    decisions, logits = [], [out.logits[0, -1]]
    tok, tokens = logits[0].argmax().view(1, 1), [int(logits[0].argmax())]
    with own_attention(eager, _var_step_attention(sinks, visual, decisions)), torch.no_grad():
        for t in range(STEPS - 1):  # FastV keeps original positions: decoding continues after the prompt
            step = eager(input_ids=tok, cache=cache, position_ids=torch.tensor([[ids.numel() + t]]),
                         attention_mask=torch.ones(1, n_kept + t + 1, dtype=torch.long), use_cache=True)
            cache, tok = step.cache, step.logits[:, -1].argmax(-1, keepdim=True)
            logits.append(step.logits[0, -1])
            tokens.append(int(tok))
    assert all(((p - VAR_CFG["tau"]).abs() > MARGIN).all() for p in phis.values())  # SDPA / eager cannot flip
    return tokens, torch.stack(logits), decisions, sinks, visual


@pytest.mark.parametrize("shape", sorted(BATCHES))
def test_var_after_fastv_decodes_on_the_evicted_cache_as_the_reference(models, eager_copy, shape):
    """VAR's layers 1, 2 lie before FastV's cut at 3: their caches are evicted, and VAR's sinks (found at the
    prefill over the full sequence) must follow the tokens into the evicted layout in every decode step."""
    model, eager = models("llava"), eager_copy("llava")
    seeds = BATCHES[shape]
    tokens, logits = _var_generate(model, batch_of(model, "llava", seeds), "fastv")
    for b, seed in enumerate(seeds):
        ref_tokens, ref_logits, decisions, sinks, visual = _var_evicted_reference(model, eager, batch_of(model, "llava", [seed]))
        assert all(bool((s & visual).any()) for s in sinks.values())  # kept visual sinks in both layers
        assert any(bool(d["selected"].any()) for d in decisions)  # decode rows were redistributed
        for d in decisions:
            assert ((d["a_img"] - VAR_CFG["min_image_mass"]).abs() > MARGIN).all()
            assert ((d["ratio"] - VAR_CFG["rho"]).abs() > MARGIN).all()
        assert tokens[b].tolist() == ref_tokens, (b, seed)
        torch.testing.assert_close(logits[b], ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("first", ["transprune", "vflowopt"])
def test_var_after_multi_stage_cuts_generates_on_the_evicted_cache(models, first):
    """TransPrune and VFlowOpt cut at several LLM layers: VAR's evicted layers decode, and a padded batch gives each
    prompt's own tokens and logits."""
    model = models("llava")
    tokens, logits = _var_generate(model, batch_of(model, "llava", [0, 1]), first)
    for b in range(2):
        alone_tokens, alone_logits = _var_generate(model, batch_of(model, "llava", [b]), first)
        assert tokens[b].tolist() == alone_tokens[0].tolist()
        torch.testing.assert_close(logits[b], alone_logits[0], atol=1e-4, rtol=1e-4)
