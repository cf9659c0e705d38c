"""Batch width after a cut (issue 23, item 3): a left-padded batch is as wide as its longest remaining sample after
every cut (pre_llm, llm k, the cut implied by vision cuts, evict_early_kv), in the prefill and in the decode steps.
A text-only sample keeps all its tokens; it must not keep the pruned samples as wide as the uncut batch."""

from __future__ import annotations

import pytest
import torch

import vtprune

from ..conftest import IMAGE_TOKEN, Prompt, collate, make_prompt

STEPS = 4
RUNS = {  # id -> (method, settings, pipeline options)
    "pre_llm": ("random", dict(ratio=0.75, seed=0), {}),
    "llm": ("fastv", dict(ratio=0.75, layer=2), {}),
    "llm_evict": ("fastv", dict(ratio=0.75, layer=2), dict(evict_early_kv=True)),
    "vision": ("flowcut", dict(ratio=0.75, shared_prune_count=False), {}),
}
TEXT_ONLY = {"short": 6, "long": 40}  # text-only prompt length: below / above the pruned samples' remaining length


def _text_only(image_prompt: Prompt, length: int, family: str) -> Prompt:
    ids = torch.cat([torch.tensor([1]), torch.arange(length - 1) % 90 + 3])
    pixels = image_prompt.pixel_values[:0]
    return Prompt(ids, pixels, [] if family == "llava_next" else None)


def _batch(model, family, text_len):
    first = make_prompt(model, family, 3, 0)
    prompts = [first, _text_only(first, text_len, family), make_prompt(model, family, 7, 1)]
    return prompts, collate(prompts)


def _alone(prompt: Prompt) -> dict:
    """A batch of one prompt; a text-only one gets no (empty) pixel_values."""
    batch = collate([prompt])
    if not bool((prompt.input_ids == IMAGE_TOKEN).any()):
        batch.pop("pixel_values")
        batch.pop("image_sizes", None)
    return batch


def _remaining(batch, stats, layer: int) -> torch.Tensor:
    """[B] tokens each sample still has in decoder ``layer``: its unpadded length minus the visual tokens every cut
    at or before the layer removed (from the kept counts)."""
    left = batch["attention_mask"].sum(1).clone()
    for img in stats.images:
        stages = [st for st in img.stages if st.stage == "pre_llm" or st.stage == "llm" and st.layer <= layer]
        if stages:
            left[img.sample] -= img.n_tokens - stages[-1].tokens_out
    return left


def _record_widths(model):
    """Pre-hooks registered after vtprune's: per decoder layer and call, the widths of what the layer really gets."""
    seen, handles = {}, []
    for i, layer in enumerate(model.model.language_model.layers):
        def hook(module, args, kwargs, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            mask, (cos, sin) = kwargs.get("attention_mask"), kwargs["position_embeddings"]
            seen.setdefault(i, []).append(dict(
                hidden=hidden.shape[1], positions=kwargs["position_ids"].shape[-1], cos=cos.shape[-2],
                sin=sin.shape[-2], mask_keys=None if mask is None else mask.shape[-1]))
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def _expected_widths(batch, stats, n_layers: int, evicted: bool) -> list[int]:
    """Per decoder layer: the cached length after the prefill. Layers before any cut keep the padded input width;
    after a cut, the longest remaining sample (evicted: the final one everywhere)."""
    T = batch["input_ids"].shape[1]
    cut_at = [st.layer if st.stage == "llm" else 0 for img in stats.images for st in img.stages
              if st.stage != "vision" and st.tokens_out < st.tokens_in]  # vision stages count patches
    final = int(_remaining(batch, stats, n_layers - 1).max())
    return [final if evicted else int(_remaining(batch, stats, l).max()) if any(c <= l for c in cut_at) else T
            for l in range(n_layers)]


@pytest.mark.parametrize("text", sorted(TEXT_ONLY))
@pytest.mark.parametrize("run", sorted(RUNS))
@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl"])
def test_width_after_a_cut_is_the_longest_remaining_sample(models, family, run, text):
    model = models(family)
    method, settings, options = RUNS[run]
    prompts, batch = _batch(model, family, TEXT_ONLY[text])
    n_layers = model.config.text_config.num_hidden_layers
    with vtprune.pruned(model, method, **settings, **options), torch.no_grad():
        seen, handles = _record_widths(model)
        try:
            out = model(**batch, use_cache=True)
            stats = model.vtprune.stats
            gen = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True)
        finally:
            for h in handles:
                h.remove()
        singles, single_kept = [], []
        for p in prompts:  # each prompt alone: its tokens and (image prompts) its kept sets
            singles.append(model.generate(**_alone(p), max_new_tokens=STEPS, do_sample=False)[0, -STEPS:].tolist())
            single_kept += [i.kept_index for i in model.vtprune.stats.images] if model.vtprune.stats else []
    widths = _expected_widths(batch, stats, n_layers, evicted=False)  # what each layer computes the prefill on
    cached = _expected_widths(batch, stats, n_layers, evicted=bool(options))  # what its cache holds afterwards
    assert min(widths) < batch["input_ids"].shape[1]  # the cut shrank the batch despite the text-only sample
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == cached
    assert out.logits.shape[1] == widths[-1]
    for layer in range(n_layers):
        prefill = seen[layer][0]  # the first call: the plain forward's prefill
        got = (prefill["hidden"], prefill["positions"], prefill["cos"], prefill["sin"])
        assert got == (widths[layer],) * 4, (layer, prefill)
        assert prefill["mask_keys"] in (None, widths[layer]), (layer, prefill)
        for step, got in enumerate(seen[layer][-(STEPS - 1):]):  # decode steps of generate()
            assert got["hidden"] == got["positions"] == got["cos"] == 1
            assert got["mask_keys"] in (None, cached[layer] + step + 1), (layer, step, got)
    assert [layer.keys.shape[-2] for layer in gen.past_key_values.layers] == [w + STEPS - 1 for w in cached]
    assert gen.sequences[:, -STEPS:].tolist() == singles  # batched == each prompt alone
    assert [i.kept_index for i in stats.images] == single_kept
