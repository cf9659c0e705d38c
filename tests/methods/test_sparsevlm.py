"""SparseVLM (spec sparsevlm_pdrop.md §1): raters from the embeddings, stage 1 against an unpruned eager forward,
recycled vectors against a noise-free DPC-kNN written here, every stage and the logits against a slow
layer-by-layer reference, decoding, batches, and the official token arithmetic on a 576-token, 32-layer model."""

from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.errors import ConfigError

from ..conftest import IMAGE_TOKEN, Prompt, collate, make_prompt
from ..helpers import merged_embeds
from .inllm_reference import Cut, generate_batched_and_alone, reference_forward, text_only

PRUNE = (0, 1, 2)  # (2, 6, 15) of 32 layers mapped onto the 4-layer test LLMs: cuts before 1, 2, 3
TABLE = (24, 12, 6)
STEPS = 4


def _runs(ids):
    pos = torch.nonzero(ids == IMAGE_TOKEN).flatten()
    breaks = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    return list(torch.tensor_split(pos, breaks.tolist()))


def rater_mask(embeds, image_pos, instr_pos):
    """[q] bool: mean over image rows of softmax over the text of the raw dot products, above its mean (§1.3)."""
    v, t = embeds[image_pos].float(), embeds[instr_pos].float()
    r = torch.softmax(v @ t.T, dim=-1).mean(0)
    return r > r.mean()


def dpc_knn_reference(x, c):
    """Noise-free DPC-kNN, written with loops: [c, D] cluster means, clusters in the order of their centres."""
    m, D = x.shape
    dist = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1).sqrt() / D ** 0.5
    density = [float(torch.exp(-(dist[i].sort().values[:c] ** 2).mean())) for i in range(m)]
    top = float(dist.max())
    delta = [min([float(dist[i, j]) for j in range(m) if density[j] > density[i]], default=top) for i in range(m)]
    centres = sorted(range(m), key=lambda i: (-delta[i] * density[i], i))[:c]
    assign = [min(range(c), key=lambda a: (float(dist[centres[a], i]), a)) for i in range(m)]
    for a, i in enumerate(centres):
        assign[i] = a
    return torch.stack([sum(x[i] for i in range(m) if assign[i] == a) / (assign.count(a) + 1e-6) for a in range(c)])


def recycled_count(d):
    return (int(0.3 * d) + 1) // 10 + 1


def _reference(eager, prompt, table=TABLE, seen=None):
    """The official v1.5 loop (cuts after PRUNE), per image: raters vs the instruction after the sample's last image."""
    ids = prompt.input_ids
    images = _runs(ids)
    embeds = merged_embeds(eager, collate([prompt]))
    instr = torch.arange(int(images[-1][-1]) + 1, ids.numel())
    raters = [rater_mask(embeds[0], run, instr) for run in images]

    def decide(stage):
        def fn(probs, out, slots, m):
            L = probs.shape[-1]
            rows = L - instr.numel() + torch.nonzero(raters[m]).flatten()
            score = probs.mean(0)[rows][:, slots].mean(0)
            n = slots.numel()
            keep = torch.topk(score, min(table[stage], n - 1)).indices.sort().values
            gone = torch.tensor([j for j in range(n) if j not in set(keep.tolist())], dtype=torch.long)
            cand = gone[torch.sort(score[gone], descending=True, stable=True).indices[:int(0.3 * gone.numel()) + 1]]
            merged = dpc_knn_reference(out[slots[cand]].float(), cand.numel() // 10 + 1)
            if seen is not None:
                seen.append(merged)
            return keep, merged
        return fn

    return reference_forward(eager, embeds, images, {l: Cut(decide(s), after=True) for s, l in enumerate(PRUNE)}), raters


def _stages(stats):
    return [[st.kept_index for st in img.stages] for img in stats.images]


def test_raters_are_the_embedding_softmax_above_its_mean(models):
    model = models("llava")
    prompt = make_prompt(model, "llava", 9, 3, n_images=2)
    method = vtprune.method("sparsevlm", table=TABLE)
    got, original = [], method.raters
    method.raters = lambda image: got.append(original(image).clone()) or got[-1]  # record (instance attribute)
    with vtprune.pruned(model, method), torch.no_grad():
        model(**collate([prompt]))
    emb = merged_embeds(model, collate([prompt]))[0]
    images = _runs(prompt.input_ids)
    instr = torch.arange(int(images[-1][-1]) + 1, prompt.input_ids.numel())
    expected = [rater_mask(emb, run, instr) for run in images]
    assert len(got) == 2 * len(PRUNE)  # asked at every stage, computed once
    for i, mask in enumerate(got):
        assert torch.equal(mask, expected[i % 2]) and 0 < int(mask.sum()) < mask.numel()


def test_stage_one_is_the_top_of_the_eager_rater_attention(models, eager_copy):
    model, eager = models("llava"), eager_copy("llava")
    prompt = make_prompt(model, "llava", 9, 1)
    batch = collate([prompt])
    with torch.no_grad():
        attn = eager(**batch, output_attentions=True).attentions[PRUNE[0]][0]  # [H, T, T]
    emb = merged_embeds(model, batch)[0]
    img = _runs(prompt.input_ids)[0]
    instr = torch.arange(int(img[-1]) + 1, prompt.input_ids.numel())
    rows = instr[rater_mask(emb, img, instr)]
    score = attn.mean(0)[rows][:, img].mean(0)
    expected = torch.topk(score, TABLE[0]).indices.sort().values.tolist()
    with vtprune.pruned(model, "sparsevlm", table=TABLE), torch.no_grad():
        model(**batch)
        stage = model.vtprune.stats.images[0].stages[0]
        assert model.config.text_config._attn_implementation in ("sdpa", "vtprune+sdpa")  # never eager
    assert stage.kept_index == expected
    assert stage.tokens_out == TABLE[0] + recycled_count(64 - TABLE[0])


def test_recycled_vectors_are_the_dpc_knn_means(models, eager_copy):
    """Rows entering the layer after the first cut: the kept tokens, then the DPC-kNN means of layer 0's output."""
    model = models("llava")
    prompt = make_prompt(model, "llava", 9, 2)
    seen, entering = [], {}
    ref, _ = _reference(eager_copy("llava"), prompt, seen=seen)
    layer = model.model.language_model.layers[PRUNE[0] + 1]
    with vtprune.pruned(model, "sparsevlm", table=TABLE), torch.no_grad():
        def record(mod, args, kwargs):  # after vtprune's cut hook: what the layer really gets
            entering.setdefault("h", (args[0] if args else kwargs["hidden_states"]).clone())

        handle = layer.register_forward_pre_hook(record, with_kwargs=True)
        try:
            model(**collate([prompt]))
        finally:
            handle.remove()
    start = int(_runs(prompt.input_ids)[0][0])
    c = recycled_count(64 - TABLE[0])
    got = entering["h"][0, start + TABLE[0]:start + TABLE[0] + c]
    assert seen[0].shape[0] == c > 1
    torch.testing.assert_close(got, seen[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family,n_images", [("llava", 1), ("llava", 2), ("llava_next", 1), ("internvl", 1)])
def test_every_stage_and_the_logits_equal_the_slow_reference(models, eager_copy, family, n_images):
    model = models(family)
    prompt = make_prompt(model, family, 6, 4, n_images=n_images)
    table = TABLE if family != "internvl" else (9, 5, 2)
    with vtprune.pruned(model, "sparsevlm", table=table), torch.no_grad():
        logits = model(**collate([prompt])).logits[0, -1]
        stats = model.vtprune.stats
    ref, _ = _reference(eager_copy(family), prompt, table=table)
    assert _stages(stats) == ref.kept
    assert [[st.tokens_out for st in img.stages] for img in stats.images] == ref.counts
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("version", ["v1.5", "plus"])
def test_batch_with_zero_one_two_images_equals_each_alone(models, version):
    model = models("llava")
    one = make_prompt(model, "llava", 5, 0)
    prompts = [one, text_only(9, one), make_prompt(model, "llava", 8, 1, n_images=2)]
    with vtprune.pruned(model, "sparsevlm", version=version, keep=24), torch.no_grad():
        batched, kept, singles, single_kept = generate_batched_and_alone(model, prompts, STEPS, _stages)
    assert kept == single_kept and len(kept) == 3
    assert batched == singles


@pytest.mark.parametrize("version", ["v1.5", "plus"])
def test_cached_generate_equals_the_recompute(models, version):
    """Renumbered (v1.5) or original (plus) positions: greedy decoding on the compacted cache == recomputing the
    pruned prefill without a cache at every step (the kept layout is a function of the prompt alone)."""
    model = models("llava")
    prompt = make_prompt(model, "llava", 6, 5)
    with vtprune.pruned(model, "sparsevlm", version=version, table=TABLE), torch.no_grad():
        cached = model.generate(**collate([prompt]), max_new_tokens=STEPS, do_sample=False)[0, -STEPS:].tolist()
        ids, recomputed = prompt.input_ids, []
        for _ in range(STEPS):
            p = Prompt(ids, prompt.pixel_values)
            tok = int(model(**collate([p]), use_cache=False).logits[0, -1].argmax())
            recomputed.append(tok)
            ids = torch.cat([ids, torch.tensor([tok])])
    assert cached == recomputed


def test_beam_search_keeps_one_layout_per_prompt(models):
    model = models("llava")
    batch = collate([make_prompt(model, "llava", 5, 0), make_prompt(model, "llava", 8, 1)])
    with vtprune.pruned(model, "sparsevlm"), torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False)
        kept = _stages(model.vtprune.stats)
    assert out.shape[0] == 2 and len(kept) == 4 and kept[0] == kept[1] and kept[2] == kept[3]


def test_bad_fields_are_refused(models):
    with pytest.raises(ConfigError, match="version"):
        vtprune.method("sparsevlm", version="v3")
    with pytest.raises(ConfigError, match="schedule='rank'"):
        vtprune.method("sparsevlm", schedule="rank", keep=64)
    with pytest.raises(ConfigError, match="table"):
        vtprune.method("sparsevlm", table=(300, 200), keep=192)
    with pytest.raises(ConfigError, match="positions"):
        vtprune.method("sparsevlm", positions="original")


def _gravity(delta, head_dim, base):
    """Spec §1.4: G(delta) = (2 / sqrt(d)) sum_f cos(delta theta_f), theta_f = base^(-2f/d) (Llama RoPE)."""
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (2 / head_dim ** 0.5) * torch.cos(delta.double()[..., None] * theta).sum(-1)


def test_plus_stage_one_divides_by_gravity_and_keeps_the_priority_heads(models, eager_copy):
    model, eager = models("llava"), eager_copy("llava")
    prompt = make_prompt(model, "llava", 9, 6)
    batch = collate([prompt])
    cfg = model.config.text_config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        attn = eager(**batch, output_attentions=True).attentions[PRUNE[0]][0].double()  # [H, T, T]
    emb = merged_embeds(model, batch)[0]
    img = _runs(prompt.input_ids)[0]
    instr = torch.arange(int(img[-1]) + 1, prompt.input_ids.numel())
    rows = instr[rater_mask(emb, img, instr)]
    g = _gravity(rows[:, None] - img[None, :], head_dim, getattr(cfg, "rope_theta", None) or 10000.0)
    clamp = 2.0  # above the tiny model's smallest G here, so the clamp matters (the default 0.1 bites at ~1.5k)
    assert bool((g < clamp).any()) and bool((g > clamp).any())
    probs = attn[:, rows][:, :, img] / g.clamp(min=clamp)
    heads = round(14 * cfg.num_attention_heads / 32)
    top = torch.topk(probs.sum((1, 2)), heads).indices
    score = probs[top].mean(0).mean(0)
    expected = torch.topk(score, TABLE[0]).indices.sort().values.tolist()
    with vtprune.pruned(model, "sparsevlm", version="plus", table=TABLE, min_gravity=clamp), torch.no_grad():
        model(**batch)
        stage = model.vtprune.stats.images[0].stages[0]
    assert stage.kept_index == expected and stage.tokens_out == TABLE[0]  # no recycling
    assert "gravity clamped" in stage.note


def test_rank_schedule_keeps_scale_times_rank_plus_bias(models, eager_copy):
    model, eager = models("llava"), eager_copy("llava")
    prompt = make_prompt(model, "llava", 9, 7)
    batch = collate([prompt])
    with torch.no_grad():
        attn = eager(**batch, output_attentions=True).attentions[0][0]
    emb = merged_embeds(model, batch)[0]
    img = _runs(prompt.input_ids)[0]
    instr = torch.arange(int(img[-1]) + 1, prompt.input_ids.numel())
    p = attn.mean(0)[instr[rater_mask(emb, img, instr)]][:, img]
    k = min(int(torch.linalg.matrix_rank(p) * 3.5 + 2), 63)
    expected = torch.topk(p.mean(0), k).indices.sort().values.tolist()
    with vtprune.pruned(model, "sparsevlm", schedule="rank", layers=(0, 1, 2), scale=3.5, bias=2.0), torch.no_grad():
        model(**batch)
        stage = model.vtprune.stats.images[0].stages[0]
    assert stage.kept_index == expected and stage.tokens_out == k + recycled_count(64 - k)


def _llava_576():
    """A tiny LLaVA with LLaVA-1.5-7B's token arithmetic: 576 tokens per image (96 px, patch 4), 32 LLM layers."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=32,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=96, patch_size=4)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=576,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).eval()
    ids = torch.tensor([1] + list(range(3, 8)) + [IMAGE_TOKEN] * 576 + list(range(20, 32)))
    return model, {"input_ids": ids[None], "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long),
                   "pixel_values": torch.randn(1, 3, 96, 96)}


# spec §1.6: budget -> counts after each stage, code "equal" (post-cut), per-layer input average (SV#35)
OFFICIAL = {"v1.5": {192: (309, 204, 113), 128: (312, 117, 39), 96: (249, 55, 27), 64: (82, 32, 18)},
            "plus": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)}}
SPEC_FIGURES = {("v1.5", 192): (192.03, 206.5), ("v1.5", 128): (128.63, 145.4), ("v1.5", 64): (64.81, 82.3),
                ("plus", 128): (128.00, None), ("plus", 64): (64.44, None)}  # (96 is in the tables too)


def test_official_settings_give_the_spec_equivalent_tokens(one_thread):
    """~1 s per 32-layer forward on an idle core: 7 forwards."""
    model, batch = _llava_576()
    for (version, budget), (code, inputs) in SPEC_FIGURES.items():
        with vtprune.pruned(model, "sparsevlm", version=version, keep=budget), torch.no_grad():
            model(**batch)
            img = model.vtprune.stats.images[0]
        counts = OFFICIAL[version][budget]
        assert [st.tokens_out for st in img.stages] == list(counts)
        assert [st.layer for st in img.stages] == [3, 7, 16]
        post = (2 * 576 + 4 * counts[0] + 9 * counts[1] + 17 * counts[2]) / 32  # layer l counted as pruned
        layer_in = (3 * 576 + 4 * counts[0] + 9 * counts[1] + 16 * counts[2]) / 32
        assert img.equivalent_tokens_post_cut == pytest.approx(post) and abs(post - code) <= 0.005 + 1e-9
        assert img.equivalent_tokens == pytest.approx(layer_in)
        assert inputs is None or abs(layer_in - inputs) <= 0.05 + 1e-9
    for kwargs, counts, average in [({}, (288, 144, 72), 270), ({"keep": 192}, (146, 37, 9), 192)]:  # PDrop §2.6
        with vtprune.pruned(model, "pdrop", **kwargs), torch.no_grad():
            model(**batch)
            img = model.vtprune.stats.images[0]
        assert [st.tokens_out for st in img.stages] == list(counts) and img.equivalent_tokens == average


@pytest.mark.parametrize("family,convention", [("llava", "code"), ("llava_next", "input"), ("internvl", "code")])
def test_other_budgets_hit_the_layer_average_within_a_token(models, family, convention):
    """Not a 576-token table setting: the 192 table's shape scaled to the budget (keep per standard image, anyres
    images scaled by N / nominal), in the asked convention."""
    model = models(family)
    nominal = {"internvl": 16}.get(family, 64)  # image_seq_length of the tiny configs
    keep = nominal // 3
    prompts = [make_prompt(model, family, 5 + 2 * i, i) for i in range(2)]
    with vtprune.pruned(model, "sparsevlm", keep=keep, convention=convention), torch.no_grad():
        model(**collate(prompts))
        stats = model.vtprune.stats
    for img in stats.images:
        target = keep * img.n_tokens / nominal
        got = img.equivalent_tokens_post_cut if convention == "code" else img.equivalent_tokens
        assert abs(got - target) <= 1, (img.n_tokens, got, target)
