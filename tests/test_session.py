"""Regression tests for the session's decode, batching and state handling (issue 10, items 1-6, 8, 9)."""

from __future__ import annotations

import weakref

import pytest
import torch

import vtprune
from vtprune.errors import PruneError
from vtprune.methods.base import Cut

from .conftest import FAMILIES, build_model, collate, make_prompt

STEPS = 6
# methods whose kept set depends on the prompt only (FastV and FlowCut's anyres LLM cut read the last token,
# which use_cache=False replaces by each generated token)
PROMPT_ONLY = {
    "random": dict(ratio=0.6, seed=0),
    "visionzip": dict(keep=12),
    "vtc_cls": dict(ratio=0.6, start_layer=0),
    "flowcut": dict(ratio=0.75, shared_prune_count=False),
    "vflowopt": dict(ratio=0.6),
}
# TransPrune's instruction attention reads every prompt token after the image, which use_cache=False extends
ALL_METHODS = {**PROMPT_ONLY, "fastv": dict(ratio=0.6), "transprune": {}}


def _prompts(model, family, n=2):
    return [make_prompt(model, family, text_len=3 + 4 * i, seed=i) for i in range(n)]


def _generate(model, batch, **kwargs):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=STEPS, do_sample=False, **kwargs)


def _record_positions(model):
    """Forward pre-hooks (registered after vtprune's, so they see what the layer really gets) collecting the
    last column of position_ids per decoder layer and call."""
    seen: dict[int, list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.model.language_model.layers):
        def hook(module, args, kwargs, i=i):
            seen.setdefault(i, []).append(kwargs["position_ids"][:, -1].clone())
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def _renumbered_away(stats, method, sample: int, layer: int) -> int:
    """Visual tokens of ``sample`` removed, before decoder ``layer``, by the cuts that renumber positions (from the
    kept layout in ``stats`` and each cut's position mode)."""
    removed = 0
    for img in stats.images:
        if img.sample != sample:
            continue
        before = img.n_tokens
        for st in img.stages:
            if st.stage != "llm" or st.layer <= layer:
                cut = Cut("llm", st.layer) if st.stage == "llm" else Cut("pre_llm")
                if method.positions_at(cut) == "renumber":
                    removed += before - st.tokens_out
                before = st.tokens_out
    return removed


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(ALL_METHODS))
def test_decode_positions_of_every_layer_follow_the_kept_layout(models, family, method):
    model = models(family)
    batch = collate(_prompts(model, family))
    valid = batch["attention_mask"].sum(1)
    with vtprune.pruned(model, method, **ALL_METHODS[method]):
        seen, handles = _record_positions(model)
        try:
            _generate(model, batch)
        finally:
            for h in handles:
                h.remove()
        stats, pruner = model.vtprune.stats, model.vtprune.method
    for layer, calls in seen.items():
        assert len(calls) == STEPS
        for step, pos in enumerate(calls[1:]):  # calls[0] is the prefill
            for b in range(pos.shape[0]):
                kept_prompt = int(valid[b]) - _renumbered_away(stats, pruner, b, layer)
                assert int(pos[b]) == kept_prompt + step, (layer, step, b)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(PROMPT_ONLY))
def test_cached_generate_equals_recompute_without_cache(models, family, method):
    if method == "flowcut" and family == "llava_next":
        pytest.skip("FlowCut's anyres LLM cut scores with the last token, which use_cache=False changes each step")
    model = models(family)
    batch = collate(_prompts(model, family))
    with vtprune.pruned(model, method, **PROMPT_ONLY[method]):
        cached = _generate(model, batch)
        recomputed = _generate(model, batch, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_generate_from_inputs_embeds_with_images_is_a_clear_error(models):
    model = models("llava")
    batch = collate(_prompts(model, "llava", 1))
    embeds = model.get_input_embeddings()(batch["input_ids"])
    vtprune.prune(model, "fastv", ratio=0.5)
    with pytest.raises(PruneError, match="pass input_ids.*the model is unpruned now"):
        model.generate(inputs_embeds=embeds, pixel_values=batch["pixel_values"],
                       attention_mask=batch["attention_mask"], max_new_tokens=2)
    assert not hasattr(model, "vtprune")  # restored unpruned, as after any error inside a pruned forward


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_handed_back_are_not_compacted_afterwards(models, family):
    model = models(family)
    batch = collate(_prompts(model, family, 1))
    with vtprune.pruned(model, "fastv", ratio=0.5, layer=2):
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True).hidden_states
    hs = out.hidden_states
    for i in range(3):  # embeddings and the outputs of layers 0 and 1 (the input of the cut layer 2) are full
        torch.testing.assert_close(hs[i], ref[i], atol=1e-5, rtol=0)
    assert hs[3].shape[1] < ref[3].shape[1]  # from layer 2 on they are the pruned ones


def test_text_only_forward_resets_stats(models):
    model = models("llava")
    batch = collate(_prompts(model, "llava", 1))
    with vtprune.pruned(model, "random", ratio=0.5):
        with torch.no_grad():
            model(**batch)
            assert model.vtprune.stats is not None
            model(input_ids=torch.tensor([[1, 5, 6, 7]]))
        assert model.vtprune.stats is None


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_decode_steps_keep_the_prefills_stats(models, ratio):
    """generate()'s decode steps are not new forwards: stats still describe the image prefill (ratio 0 included,
    where no LLM hook tells the steps apart)."""
    model = models("llava")
    batch = collate(_prompts(model, "llava", 1))
    with vtprune.pruned(model, "fastv", ratio=ratio):
        _generate(model, batch)
        stats = model.vtprune.stats
        assert stats is not None and stats.images[0].n_tokens == 64
        assert stats.images[0].kept == (64 if ratio == 0 else 32)


def test_models_sharing_one_config_prune_and_unprune_independently():
    first = build_model("llava")
    second = type(first)(first.config).eval()  # same config object, as from_pretrained twice on one config
    second.load_state_dict(first.state_dict())
    assert second.config is first.config
    config = first.config.text_config
    original = config._attn_implementation
    batch = collate(_prompts(first, "llava", 1))
    vtprune.prune(first, "fastv", ratio=0.5)
    vtprune.prune(second, "fastv", ratio=0.5)
    with torch.no_grad():
        both = second(**batch).logits
    vtprune.unprune(first)
    with torch.no_grad():
        alone = second(**batch).logits  # still pruned, its attention recorder still reached
    assert hasattr(second, "vtprune") and second.vtprune.stats is not None
    torch.testing.assert_close(alone, both, atol=0, rtol=0)
    vtprune.unprune(second)
    assert config._attn_implementation == original


def _manually_pruned_embeds(model, batch, stats):
    from .helpers import kept_sequence_positions, merged_embeds

    keep = kept_sequence_positions(batch["input_ids"][0], model.config.image_token_id,
                                   [i.kept_index for i in stats.images], [i.n_tokens for i in stats.images])
    return merged_embeds(model, batch)[:, keep]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["beams", "sampling"])
def test_expanded_generate_equals_the_same_search_on_the_pruned_sequence(models, family, mode):
    model = models(family)
    batch = collate(_prompts(model, family, 1))
    search = dict(num_beams=3, num_return_sequences=2) if mode == "beams" else dict(do_sample=True,
                                                                                   num_return_sequences=3)
    with vtprune.pruned(model, "random", ratio=0.6, seed=1):
        with torch.no_grad():
            model(**batch)
        stats = model.vtprune.stats
        torch.manual_seed(0)
        with torch.no_grad():
            pruned = model.generate(**batch, max_new_tokens=STEPS, **search)[:, -STEPS:]
        copies = model.vtprune.stats.images
    assert len(copies) == 3  # one per beam / returned sequence
    assert all(c.kept_index == stats.images[0].kept_index for c in copies)
    embeds = _manually_pruned_embeds(model, batch, stats)
    torch.manual_seed(0)
    with torch.no_grad():
        ref = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                             max_new_tokens=STEPS, **search)[:, -STEPS:]
    assert torch.equal(pruned, ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(ALL_METHODS))
def test_beam_search_keeps_each_prompts_own_kept_set(models, family, method):
    model = models(family)
    prompts = _prompts(model, family)
    with vtprune.pruned(model, method, **ALL_METHODS[method]):
        single = []
        for p in prompts:
            with torch.no_grad():
                model(**collate([p]))
            single.append([i.kept_index for i in model.vtprune.stats.images])
        _generate(model, collate(prompts), num_beams=2)
        beams = [[i.kept_index for i in model.vtprune.stats.images if i.sample == b] for b in range(4)]
    assert beams == [single[0], single[0], single[1], single[1]]


def test_internvl_image_not_a_whole_number_of_tiles_is_vtprunes_own_error(models):
    from .conftest import IMAGE_TOKEN, IMG_END, IMG_START

    model = models("internvl")
    one_tile = make_prompt(model, "internvl", 5, 0).pixel_values[:1]
    ids = torch.tensor([[1, 5, IMG_START] + [IMAGE_TOKEN] * 15 + [IMG_END, 7]])  # 16 per tile
    vtprune.prune(model, "fastv", ratio=0.5)
    with pytest.raises(PruneError, match="^vtprune: an InternVL image has 15 <IMG_CONTEXT> tokens"):
        model(input_ids=ids, pixel_values=one_tile)
    assert not hasattr(model, "vtprune")


def test_internvl_image_token_mismatch_is_a_clear_error_and_restores(models):
    from .conftest import IMAGE_TOKEN, IMG_END, IMG_START

    model = models("internvl")
    one_tile = make_prompt(model, "internvl", 5, 0).pixel_values[:1]
    ids = torch.tensor([[1, 5, IMG_START] + [IMAGE_TOKEN] * 32 + [IMG_END, 7]])  # two tiles' worth of tokens
    vtprune.prune(model, "fastv", ratio=0.5)
    with pytest.raises(PruneError, match="need 2 vision crops/tiles but pixel_values hold 1"):
        model(input_ids=ids, pixel_values=one_tile)
    assert not hasattr(model, "vtprune")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(ALL_METHODS))
def test_right_padded_batch_is_refused(models, family, method):
    model = models(family)
    batch = collate(_prompts(model, family))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for b in range(ids.shape[0]):  # move each sample's padding to the right
        n = int(mask[b].sum())
        ids[b] = torch.cat([ids[b, -n:], ids[b, :-n]])
        mask[b] = torch.cat([mask[b, -n:], mask[b, :-n]])
    vtprune.prune(model, method, **ALL_METHODS[method])
    with pytest.raises(PruneError, match="right-padded.*padding_side = 'left'"):
        with torch.no_grad():
            model(**batch)
    assert not hasattr(model, "vtprune")


@pytest.mark.parametrize("method,kwargs", [("fastv", dict(layer=9)), ("vtc_cls", dict(start_layer=2)),
                                           ("flowcut", dict(llm_layer=4))])
def test_ratio_zero_still_checks_the_layers_against_the_model(models, method, kwargs):
    model = models("llava")  # 4 LLM layers, features read after vision layer 1
    with pytest.raises(ValueError, match="layer"):
        vtprune.prune(model, method, ratio=0.0, **kwargs)
    assert not hasattr(model, "vtprune")


@pytest.mark.parametrize("how", ["generate", "forward"])
@pytest.mark.parametrize("pipeline", [dict(method="fastv", ratio=0.5), dict(method="var", sink_dims=(17, 31))])
def test_static_cache_is_refused_at_the_first_forward(models, how, pipeline):
    """Issue 23 item 13: a preallocated cache is refused before the language model runs, naming it and the fix; the
    model is left unpruned and works."""
    from transformers import StaticCache

    model = models("llava")
    batch = collate(_prompts(model, "llava", 1))
    llm_calls = []
    handle = model.model.language_model.register_forward_pre_hook(lambda *_: llm_calls.append(1))
    vtprune.prune(model, **pipeline)
    try:
        refused = r'StaticCache \(cache_implementation="static"\).*default DynamicCache'
        with pytest.raises(PruneError, match=refused) as info:
            with torch.no_grad():
                if how == "generate":
                    model.generate(**batch, max_new_tokens=3, do_sample=False, cache_implementation="static")
                else:
                    cache = StaticCache(config=model.config, max_cache_len=batch["input_ids"].shape[1] + 4)
                    model(**batch, cache=cache, use_cache=True)
        left_pruned = hasattr(model, "vtprune")
    finally:
        handle.remove()
        if hasattr(model, "vtprune"):  # a failure here must not leave the shared model pruned for other tests
            vtprune.unprune(model)
    assert not llm_calls  # refused at the first forward, before the language model ran
    assert not left_pruned
    assert str(info.value).endswith("(or pass no cache). vtprune removed its hooks; the model is unpruned now "
                                    "(call vtprune.prune again).")  # two sentences, not run together
    plain = _generate(model, batch)
    assert torch.equal(_generate(model, batch, cache_implementation="static"), plain)  # usable, unpruned


def test_static_cache_at_ratio_zero_is_the_unpruned_model(models):
    """Ratio 0 changes nothing (no LLM hook), so a static cache works there as without vtprune."""
    model = models("llava")
    batch = collate(_prompts(model, "llava", 1))
    plain = _generate(model, batch)
    with vtprune.pruned(model, "fastv", ratio=0.0):
        assert torch.equal(_generate(model, batch, cache_implementation="static"), plain)


# --- what the session keeps after a forward / generate() (issue 23 item 10) ------------------------------------------


def _release_pipeline():
    """Vision probe records (VisionZip) and an LLM cut (FastV: a compacted cache with its layouts)."""
    return [vtprune.method("visionzip", keep=24), vtprune.method("fastv", ratio=0.5)]


def _tensors(x):
    """Every tensor inside a probe record (tensors, tuples / lists / dicts of them, dataclasses)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    elif hasattr(x, "__dataclass_fields__"):
        x = [getattr(x, f) for f in x.__dataclass_fields__]
    return [t for item in x for t in _tensors(item)] if isinstance(x, (list, tuple)) else []


def _watch(model, refs: dict):
    """A language-model forward hook (after vtprune's) keeping weak references to the prefill's KV cache and to
    the vision probe records of the run; returns its handle."""

    def hook(module, args, kwargs, output):
        if "cache" not in refs and output.cache is not None:
            refs["cache"] = weakref.ref(output.cache)
            run = model.vtprune.vision_run()
            refs["records"] = [weakref.ref(t) for rec in run.records.values() for t in _tensors(rec)]

    return model.model.language_model.register_forward_hook(hook, with_kwargs=True)


class _RaiseAtStep:
    """A logits processor failing in generate()'s second step (a decode step, outside vtprune's hooks)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("stop here")
        return scores


@pytest.mark.parametrize("ending", ["returns", "raises"])
def test_generate_releases_its_cache_pixel_values_and_records(models, ending):
    """After generate() returns (or raises) nothing of that run is kept alive by vtprune; stats stay."""
    import gc

    from transformers import LogitsProcessorList

    model = models("llava")
    batch = collate(_prompts(model, "llava"))
    pixel_values = batch.pop("pixel_values").clone()  # only this test and generate() hold it
    refs = {"pixel_values": weakref.ref(pixel_values)}
    vtprune.prune(model, _release_pipeline())
    handle = _watch(model, refs)
    try:
        processors = LogitsProcessorList([_RaiseAtStep()] if ending == "raises" else [])
        try:
            with torch.no_grad():
                model.generate(**batch, pixel_values=pixel_values, max_new_tokens=3, do_sample=False,
                               logits_processor=processors)
            raised = False
        except RuntimeError as err:  # not kept: its traceback would hold generate()'s frames
            raised = "stop here" in str(err)
        assert raised == (ending == "raises")
        del pixel_values
        gc.collect()
        assert refs["records"], "the pipeline records vision probes"
        alive = [name for name in ("pixel_values", "cache") if refs[name]() is not None]
        alive += ["a record"] if any(r() is not None for r in refs["records"]) else []
        assert not alive, f"still referenced after generate(): {alive}"
        stats = model.vtprune.stats  # still pruned (the failure was not vtprune's), stats of the prefill kept
        assert stats is not None and [i.kept for i in stats.images] == [12, 12]
    finally:
        handle.remove()
        vtprune.unprune(model)


def _decode_by_hand(model, cache, mask, tok, steps: int) -> torch.Tensor:
    """Greedy steps with ``cache=`` and the original-layout 2-D mask grown by one column per step."""
    tokens = []
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        step = model(input_ids=tok, cache=cache, attention_mask=mask, use_cache=True)
        cache, tok = step.cache, step.logits[:, -1:].argmax(-1)
        tokens.append(tok)
    return torch.cat(tokens, 1)


def test_a_plain_forwards_cache_is_continued_by_hand_and_nothing_else_is_kept(models):
    """Rule: a plain forward's pixel values and probe records are released when it returns; its cache's layout
    stays only while the caller holds the cache, so decoding by hand with ``cache=out.cache`` works, also after
    other forwards in between (here: the same tokens as generate()), and dropping the cache frees everything."""
    import gc

    model = models("llava")
    batch, other = collate(_prompts(model, "llava")), collate(_prompts(model, "llava", 3)[2:])
    steps = 4
    with vtprune.pruned(model, _release_pipeline()), torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=steps, do_sample=False)[:, -steps:]
        pixel_values = batch.pop("pixel_values").clone()
        refs = {"pixel_values": weakref.ref(pixel_values)}
        handle = _watch(model, refs)
        try:
            out = model(**batch, pixel_values=pixel_values, use_cache=True)
        finally:
            handle.remove()
        del pixel_values
        gc.collect()
        assert refs["pixel_values"]() is None and not any(r() is not None for r in refs["records"])
        first = out.logits[:, -1:].argmax(-1)
        mask = batch["attention_mask"]
        tokens = _decode_by_hand(model, out.cache, mask, first, 1)
        model(**other, use_cache=True)  # another prompt's prefill in between
        model.generate(**other, max_new_tokens=2, do_sample=False)
        grown = torch.cat([mask, torch.ones_like(tokens)], 1)
        tokens = torch.cat([first, tokens, _decode_by_hand(model, out.cache, grown, tokens[:, -1:], steps - 2)], 1)
        assert torch.equal(tokens, expected)
        del out
        gc.collect()
        assert refs["cache"]() is None


def test_the_cache_of_a_finished_generate_is_continued_by_hand(models):
    """generate(return_dict_in_generate=True) hands its cache back: decoding on by hand continues its tokens."""
    model = models("llava")
    batch = collate(_prompts(model, "llava"))
    with vtprune.pruned(model, "fastv", ratio=0.5), torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=5, do_sample=False)[:, -5:]
        out = model.generate(**batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(out.sequences[:, -1:])], 1)  # the first token's
        more = _decode_by_hand(model, out.cache, mask, out.sequences[:, -1:], 3)
    assert torch.equal(torch.cat([out.sequences[:, -2:], more], 1), expected)


@pytest.mark.parametrize("raised, start", [
    (PruneError("vtprune: no room (or pass no cache)"), "vtprune: no room (or pass no cache). "),
    (PruneError("vtprune: no room."), "vtprune: no room. "),
    (ValueError("bad value."), "vtprune: ValueError inside the 'fastv' hooks: bad value. "),
    (KeyError("k"), "vtprune: KeyError inside the 'fastv' hooks: 'k'. "),
])
def test_a_failure_in_a_hook_reads_as_two_sentences(raised, start):
    """The "model is unpruned now" sentence follows the failure's own with exactly one full stop between them."""
    from vtprune.session import _guard

    class Session:
        plan_name, aborted = "fastv", []

        def _abort(self):
            self.aborted.append(1)

        @_guard
        def forward(self):
            raise raised

    with pytest.raises(PruneError) as info:
        Session().forward()
    assert str(info.value) == start + "vtprune removed its hooks; the model is unpruned now (call vtprune.prune again)."
    assert Session.aborted == [1]
