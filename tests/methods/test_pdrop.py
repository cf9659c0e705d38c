"""PyramidDrop (spec sparsevlm_pdrop.md §2): stage 1 against an unpruned eager forward's attention, every stage and
the logits against a slow layer-by-layer reference, nested kept sets, the average-budget solver, batches and
decoding. The tiny test LLMs are GQA (4 query heads, 2 KV heads), so every test also checks the KV repeat."""

from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.errors import ConfigError

from ..conftest import IMAGE_TOKEN, collate, make_prompt
from ..helpers import kept_sequence_positions, merged_embeds, slow_multi_cut_generate
from .inllm_reference import Cut, generate_batched_and_alone, reference_forward, text_only

CUTS = (1, 2, 3)  # (8, 16, 24) of 32 layers mapped onto the 4-layer test LLMs
RATIOS = (0.5, 0.25, 0.125)
STEPS = 4


def _runs(ids: torch.Tensor) -> list[torch.Tensor]:
    """Each image's original positions (images are separated by text in make_prompt)."""
    pos = torch.nonzero(ids == IMAGE_TOKEN).flatten()
    breaks = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    return list(torch.tensor_split(pos, breaks.tolist()))


def _pdrop_reference(model, prompt, counts_of):
    """Kept sets and logits from the slow loop: before layer K_s, layer K_s's last-row attention (head mean) over
    the image's current tokens, top counts_of(N0)[s] in original order, positions renumbered."""
    ids = prompt.input_ids
    images = _runs(ids)

    def decide(stage):
        def fn(probs, out, slots, m):
            score = probs.mean(0)[-1, slots]
            k = counts_of(images[m].numel())[stage]
            return torch.topk(score, k).indices.sort().values, None
        return fn

    embeds = merged_embeds(model, collate([prompt]))
    return reference_forward(model, embeds, images, {k: Cut(decide(s)) for s, k in enumerate(CUTS)})


def _official_counts(n0):
    return [int(n0 * r) for r in RATIOS]


def _stages(stats):
    return [[st.kept_index for st in img.stages] for img in stats.images]


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_stage_one_is_the_top_half_of_the_eager_last_row_attention(models, eager_copy, family):
    """Layers before K_1 are untouched, so layer K_1's unpruned eager attention is the attention PDrop scores."""
    model, eager = models(family), eager_copy(family)
    prompt = make_prompt(model, family, 5, 1)
    batch = collate([prompt])
    with torch.no_grad():
        attn = eager(**batch, output_attentions=True).attentions[CUTS[0]][0]  # [H, T, T]
    img = _runs(prompt.input_ids)[0]
    score = attn.mean(0)[-1, img]
    expected = torch.topk(score, img.numel() // 2).indices.sort().values.tolist()
    with vtprune.pruned(model, "pdrop"), torch.no_grad():
        model(**batch)
        got = model.vtprune.stats.images[0].stages[0].kept_index
        assert model.config.text_config._attn_implementation in ("sdpa", "vtprune+sdpa")  # never eager
    assert got == expected


@pytest.mark.parametrize("family,n_images", [("llava", 1), ("llava", 2), ("llava_next", 1), ("internvl", 1)])
def test_every_stage_and_the_logits_equal_the_slow_reference(models, eager_copy, family, n_images):
    model = models(family)
    prompt = make_prompt(model, family, 4, 2, n_images=n_images)
    with vtprune.pruned(model, "pdrop"), torch.no_grad():
        logits = model(**collate([prompt])).logits[0, -1]
        stats = model.vtprune.stats
    ref = _pdrop_reference(eager_copy(family), prompt, _official_counts)
    assert _stages(stats) == ref.kept
    for img, stages in zip(stats.images, ref.kept):
        assert [st.layer for st in img.stages] == list(CUTS)
        assert [len(s) for s in stages] == _official_counts(img.n_tokens)  # int(N0 r_s), r relative to N0
        for a, b in zip(stages, stages[1:]):
            assert set(b) < set(a)  # kept_{s+1} is a subset of kept_s
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_generate_with_the_cache_equals_the_recompute(models, family):
    """Decode positions shift per stage (renumbered prefill): cached greedy decoding == a no-cache recompute."""
    model = models(family)
    batch = collate([make_prompt(model, family, 5, 3)])
    with vtprune.pruned(model, "pdrop"), torch.no_grad():
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        stats = model.vtprune.stats
    ids = batch["input_ids"][0]
    kept = {k: kept_sequence_positions(ids, model.config.image_token_id, [img.stages[s].kept_index for img in stats.images],
                                       [img.n_tokens for img in stats.images]) for s, k in enumerate(CUTS)}
    tokens, first = slow_multi_cut_generate(model, merged_embeds(model, batch), kept, STEPS, renumber=True)
    assert out.sequences[0, -STEPS:].tolist() == tokens
    torch.testing.assert_close(out.logits[0], first, atol=1e-5, rtol=0)


def test_batch_with_zero_one_two_images_equals_each_alone(models):
    model = models("llava")
    one = make_prompt(model, "llava", 3, 0)
    prompts = [one, text_only(9, one), make_prompt(model, "llava", 7, 1, n_images=2)]
    with vtprune.pruned(model, "pdrop", keep=30), torch.no_grad():
        batched, kept, singles, single_kept = generate_batched_and_alone(model, prompts, STEPS, _stages)
    assert kept == single_kept and len(kept) == 3
    assert batched == singles


def test_beam_search_runs_and_keeps_one_layout_per_prompt(models):
    model = models("llava")
    batch = collate([make_prompt(model, "llava", 5, 0), make_prompt(model, "llava", 8, 1)])
    with vtprune.pruned(model, "pdrop"), torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False)
        stats = model.vtprune.stats
    assert out.shape[0] == 2 and len(stats.images) == 4  # two copies of each prompt
    assert _stages(stats)[0] == _stages(stats)[1] and _stages(stats)[2] == _stages(stats)[3]


def _average(n0, counts, layers, depth):
    bounds = list(layers) + [depth]
    return (layers[0] * n0 + sum((bounds[s + 1] - bounds[s]) * c for s, c in enumerate(counts))) / depth


def test_keep_solves_lambda_for_the_layer_average(models, eager_copy):
    """keep= is the average over the LLM layers (spec §2.6): counts int(N0 lambda^s), average within one token;
    the kept sets still follow the reference."""
    model = models("llava")
    prompt = make_prompt(model, "llava", 4, 4)
    with vtprune.pruned(model, "pdrop", keep=30), torch.no_grad():
        model(**collate([prompt]))
        img = model.vtprune.stats.images[0]
    counts = [st.tokens_out for st in img.stages]
    assert abs(_average(64, counts, CUTS, 4) - 30) <= 1 and abs(img.equivalent_tokens - 30) <= 1
    lam = counts[0] / 64  # the counts follow one lambda: int(N0 lambda^s) for some lambda in [c1/N0, (c1+1)/N0)
    assert any([int(64 * l ** (s + 1)) for s in range(3)] == counts
               for l in torch.linspace(lam, lam + 1 / 64, 200).tolist())
    ref = _pdrop_reference(eager_copy("llava"), prompt, lambda n0: counts)
    assert [st.kept_index for st in img.stages] == ref.kept[0]


@pytest.mark.parametrize("target,expected", [(192, [146, 37, 9]), (270, [288, 144, 72])])
def test_the_solver_reproduces_the_spec_figures(target, expected):
    """Spec §2.6 [calc]: 576 tokens, layers 8/16/24 of 32: 192 needs lambda ~ 0.254 (146/37/9), 270 = lambda 0.5."""
    from vtprune.methods.pdrop import solve_lambda

    counts = solve_lambda(576, target, (8, 16, 24), 32)
    assert counts == expected
    assert _average(576, counts, (8, 16, 24), 32) == target


def test_an_unreachable_budget_names_the_remedy(models):
    """4 layers, explicit first cut before layer 1: at least (64 + 3) / 4 = 16.75 tokens on average."""
    model = models("llava")
    batch = collate([make_prompt(model, "llava", 4, 0)])
    with torch.no_grad():
        before = model(**batch).logits
    with pytest.raises(ConfigError, match=r"cannot average 10 .* give a budget >= 16"):
        vtprune.prune(model, "pdrop", keep=10, layers=(1, 2, 3))
    assert getattr(model, "vtprune", None) is None
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)
    with vtprune.pruned(model, "pdrop", keep=16, layers=(1, 2, 3)), torch.no_grad():  # reachable within a token
        model(**batch)
    with pytest.warns(UserWarning, match="every stage keeps 1 token"), vtprune.pruned(model, "pdrop", keep=10):
        with torch.no_grad():
            model(**batch)
        assert [st.tokens_out for st in model.vtprune.stats.images[0].stages] == [1, 1, 1]


def test_default_layers_move_the_first_cut_earlier_for_small_budgets():
    """Spec §2.6 on LLaVA-1.5-7B's shape: 8 * 576 / 32 = 144 is the official list's floor; 128 and 64 need an
    earlier first cut; an explicit official list refuses them, naming (2, 6, 12)."""
    from vtprune.methods.base import ModelInfo

    info = ModelInfo(family="llava", vision_layers=24, feature_layer=22, llm_layers=32, nominal_tokens=576)
    assert vtprune.method("pdrop").cut_layers(info) == (8, 16, 24)
    assert vtprune.method("pdrop", keep=192).cut_layers(info) == (8, 16, 24)
    assert vtprune.method("pdrop", keep=128).cut_layers(info) == (2, 10, 20)
    assert vtprune.method("pdrop", keep=64).cut_layers(info) == (2, 10, 20)  # floor (2 * 576 + 30) / 32 = 36.9
    assert vtprune.method("pdrop", ratio=0.95).cut_layers(info) == (2, 6, 12)  # 28.8 < 36.9: none reaches it, the last
    with pytest.raises(ConfigError, match=r"cut earlier \(e\.g\. layers=\(2, 6, 12\)\) or give a budget >= 144"):
        vtprune.method("pdrop", keep=128, layers=(8, 16, 24)).setup(info)


def test_bad_fields_are_refused():
    with pytest.raises(ConfigError, match="ratios"):
        vtprune.method("pdrop", ratios=(0.25, 0.5, 0.125))
    with pytest.raises(ConfigError, match="layers"):
        vtprune.method("pdrop", layers=(8, 16))
