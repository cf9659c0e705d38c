"""TransPrune (spec §3): every stage's kept set, the per-stage counts, the KV cache per segment and decoding,
against references written from the formulas on an eager copy of the tiny models (never vtprune's code)."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import vtprune

from ..conftest import collate, make_prompt
from ..helpers import kept_sequence_positions, merged_embeds, slow_multi_cut_generate

CUTS = (1, 2, 3)  # the 32-layer (7, 9, 12) mapped onto the 4-layer test LLMs
RATIOS = (0.875, 0.625, 0.125)
ACCUMULATION = (0, 1, 2)  # layers[0] - 1 .. layers[-1] - 1
NOMINAL = {"llava": 64, "llava_next": 64, "internvl": 16}
STEPS = 6


def expected_counts(n: int, family: str, keep=None, ratio=None, ratios=RATIOS) -> list[int]:
    """Docstring's budget rule: int(N * r_i); with a budget the last stage keeps it, earlier ones at least it."""
    base = [max(1, int(n * r)) for r in ratios]
    if keep is None and ratio is None:
        return base
    if ratio is not None:
        final = max(1, min(n, int(round(n * (1 - ratio)))))
    else:
        nominal = NOMINAL[family]
        final = keep if n == nominal else max(1, min(n, math.floor(n * keep / nominal + 0.5)))
    return [max(b, final) for b in base[:-1]] + [final]


def _image_runs(ids_row: torch.Tensor, image_token_id: int) -> list[torch.Tensor]:
    """Original positions of each image: the contiguous runs of the image token (one run per image here)."""
    pos = torch.nonzero(ids_row == image_token_id).flatten().tolist()
    runs, cur = [], []
    for p in pos:
        if cur and p != cur[-1] + 1:
            runs.append(cur)
            cur = []
        cur.append(p)
    if cur:
        runs.append(cur)
    return [torch.tensor(r) for r in runs]


def reference_stages(eager, batch, family, keep=None, ratio=None, direction="code", alpha=0.5):
    """Per image (batch order), per stage, the kept original indices (0..N-1), from the formulas.

    The batch is laid out as vtprune's convention asks (read from core/layout.py): each row right-aligned (left
    padding), segment 0 at the LLM's default positions arange(T) (the forward gets no position_ids); after a cut
    each sample's tokens are renumbered contiguously from the position its first real token had."""
    lm = eager.model.language_model
    rotate = sys.modules[type(lm.layers[0].self_attn).__module__].apply_rotary_pos_emb
    ids = batch["input_ids"]
    B, T = ids.shape
    valid0 = batch["attention_mask"].bool()
    image_id = eager.config.image_token_id
    # images: (sample, original positions); present: indices 0..N-1 of each image's current tokens
    images = [(b, run) for b in range(B) for run in _image_runs(ids[b], image_id)]
    present = [torch.arange(run.numel()) for _, run in images]
    counts = [expected_counts(run.numel(), family, keep, ratio) for _, run in images]
    kept = [[] for _ in images]

    with torch.no_grad():
        emb = merged_embeds(eager, batch)
        rows = [torch.nonzero(valid0[b]).flatten() for b in range(B)]  # original positions present, per sample
        start = [int(r[0]) for r in rows]  # the first real token's position id at segment 0
        h, pos, valid, slot = emb, torch.arange(T).expand(B, T), valid0, None
        ttv = {}  # layer -> [B, T_orig] TTV at original positions

        def slot_of(b, orig):  # current slot of original positions ``orig`` of sample b
            L = h.shape[1]
            r = rows[b]
            return L - r.numel() + torch.searchsorted(r, orig)

        for i, layer in enumerate(lm.layers):
            L = h.shape[1]
            allowed = (torch.arange(L)[None, :] <= torch.arange(L)[:, None])[None] & valid[:, None, :]
            allowed = allowed | torch.eye(L, dtype=torch.bool)[None]  # padding rows see themselves (no NaN)
            mask = torch.zeros(B, 1, L, L).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
            cos, sin = lm.rotary_emb(h, position_ids=pos)
            if i in CUTS:
                stage = CUTS.index(i)
                # IGA: this layer's own attention on the hidden states entering it
                attn = layer.self_attn
                x = layer.input_layernorm(h)
                q = attn.q_proj(x).view(B, L, -1, attn.head_dim).transpose(1, 2)
                k = attn.k_proj(x).view(B, L, -1, attn.head_dim).transpose(1, 2)
                q, k = rotate(q, k, cos, sin)
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                logits = (q.float() @ k.float().transpose(-1, -2)) * attn.head_dim ** -0.5
                probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)  # [B, H, L, L]
                new_rows = [r.clone() for r in rows]
                for m, (b, run) in enumerate(images):
                    cur = run[present[m]]  # original positions of the image's current tokens
                    last = max(int(run2[present[m2]].max()) for m2, (b2, run2) in enumerate(images) if b2 == b)
                    instr = rows[b][rows[b] > last]
                    iga = probs[b][:, slot_of(b, instr)][:, :, slot_of(b, cur)].mean(0).mean(0)
                    acc = sum(ttv[l][b, cur] for l in ACCUMULATION if l < i)
                    score = alpha * acc / (acc.sum() + 1e-8) + (1 - alpha) * iga / (iga.sum() + 1e-8)
                    n_keep = min(counts[m][stage], cur.numel())
                    choice = torch.topk(score, n_keep).indices.sort().values
                    dropped = cur[~torch.isin(torch.arange(cur.numel()), choice)]
                    new_rows[b] = new_rows[b][~torch.isin(new_rows[b], dropped)]
                    present[m] = present[m][choice]
                    kept[m].append(present[m].tolist())
                # the shorter, right-aligned sequence, renumbered from each sample's first position
                L2 = max(r.numel() for r in new_rows)
                h2 = torch.zeros(B, L2, h.shape[-1])
                pos2 = torch.zeros(B, L2, dtype=torch.long)
                valid2 = torch.zeros(B, L2, dtype=torch.bool)
                for b in range(B):
                    n = new_rows[b].numel()
                    h2[b, L2 - n:] = h[b, slot_of(b, new_rows[b])]
                    pos2[b, L2 - n:] = start[b] + torch.arange(n)
                    valid2[b, L2 - n:] = True
                rows, h, pos, valid = new_rows, h2, pos2, valid2
                L = L2
                allowed = (torch.arange(L)[None, :] <= torch.arange(L)[:, None])[None] & valid[:, None, :]
                allowed = allowed | torch.eye(L, dtype=torch.bool)[None]
                mask = torch.zeros(B, 1, L, L).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
                cos, sin = lm.rotary_emb(h, position_ids=pos)
            # the layer, sublayer by sublayer
            x = layer.input_layernorm(h)
            o = layer.self_attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=mask)[0]
            parts = [(x, o)]
            h = h + o
            x = layer.post_attention_layernorm(h)
            o = layer.mlp(x)
            parts.append((x, o))
            h = h + o
            if i in ACCUMULATION:
                total = torch.zeros(B, L)
                for x, o in parts:
                    x, o = x.float(), o.float()
                    cos_xo = (x * o).sum(-1) / (x.norm(dim=-1) * o.norm(dim=-1))
                    delta = 1 - cos_xo if direction == "code" else 1 - cos_xo.abs()
                    weight = delta.masked_fill(~valid, float("-inf")).softmax(-1)  # the sample's valid positions
                    total = total + torch.where(valid, o.norm(dim=-1) / x.norm(dim=-1) * weight, 0.0)
                full = torch.full((B, T), float("nan"))
                for b in range(B):
                    full[b, rows[b]] = total[b, slot_of(b, rows[b])]
                ttv[i] = full
    return kept


def _stats_stages(stats):
    return [[st.kept_index for st in img.stages] for img in stats.images]


BUDGETS = {"default": {}, "keep": {"llava": {"keep": 48}, "internvl": {"keep": 12}},
           "ratio": {"llava": {"ratio": 0.7}, "internvl": {"ratio": 0.7}}}


@pytest.mark.parametrize("family", ["llava", "internvl"])
@pytest.mark.parametrize("budget", ["default", "keep", "ratio"])
@pytest.mark.parametrize("layout", ["single", "padded"])
def test_every_stage_keeps_the_top_of_ttv_plus_iga(models, eager_copy, family, budget, layout):
    model = models(family)
    kwargs = BUDGETS[budget].get(family, {}) if budget != "default" else {}
    if layout == "single":
        prompts = [make_prompt(model, family, 5, 3)]
    else:  # three text lengths (InternVL: 1, 2, 1 tiles, so different N too)
        prompts = [make_prompt(model, family, 3 + 4 * i, i) for i in range(3)]
    batch = collate(prompts)
    with vtprune.pruned(model, "transprune", **kwargs), torch.no_grad():
        model(**batch)
        stats = model.vtprune.stats
    got = _stats_stages(stats)
    assert [[st.layer for st in img.stages] for img in stats.images] == [list(CUTS)] * len(stats.images)
    ref = reference_stages(eager_copy(family), batch, family, **kwargs)
    assert got == ref
    for img, stages in zip(stats.images, ref):
        assert [len(s) for s in stages] == expected_counts(img.n_tokens, family, **kwargs)


def test_two_images_and_paper_direction(models, eager_copy):
    """Two images in one llava prompt (each renormalised alone, instruction after the last image), and the paper's
    1 - |cos| direction term."""
    model = models("llava")
    batch = collate([make_prompt(model, "llava", 4, 5, n_images=2)])
    for direction in ("code", "paper"):
        with vtprune.pruned(model, "transprune", direction=direction), torch.no_grad():
            model(**batch)
            got = _stats_stages(model.vtprune.stats)
        assert len(got) == 2
        assert got == reference_stages(eager_copy("llava"), batch, "llava", direction=direction)


def test_paper_direction_padded_internvl(models, eager_copy):
    model = models("internvl")
    batch = collate([make_prompt(model, "internvl", 3 + 4 * i, i) for i in range(3)])
    with vtprune.pruned(model, "transprune", direction="paper", keep=12), torch.no_grad():
        model(**batch)
        got = _stats_stages(model.vtprune.stats)
    assert got == reference_stages(eager_copy("internvl"), batch, "internvl", keep=12, direction="paper")
    with vtprune.pruned(model, "transprune", keep=12), torch.no_grad():
        model(**batch)
        code = _stats_stages(model.vtprune.stats)
    assert code != got  # the direction term does change the decision here


@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl"])
def test_stage_counts_are_int_n_times_ratio(models, family):
    model = models(family)
    prompts = [make_prompt(model, family, 3 + 2 * i, i) for i in range(3)]
    with vtprune.pruned(model, "transprune"), torch.no_grad():
        model(**collate(prompts))
        stats = model.vtprune.stats
    ns = [img.n_tokens for img in stats.images]
    if family != "llava":
        assert len(set(ns)) > 1  # images of different sizes: different N, different counts
    for img in stats.images:
        n = img.n_tokens
        assert [(st.stage, st.layer) for st in img.stages] == [("llm", k) for k in CUTS]
        assert [st.tokens_out for st in img.stages] == [int(n * r) for r in RATIOS]
        assert [st.tokens_in for st in img.stages] == [n] + [int(n * r) for r in RATIOS[:-1]]
        for a, b in zip(img.stages, img.stages[1:]):
            assert set(b.kept_index) <= set(a.kept_index)
        assert img.kept == int(n * RATIOS[-1])


@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl"])
def test_kv_cache_of_each_segment_holds_its_tokens(models, family):
    model = models(family)
    prompt = make_prompt(model, family, 5, 1)
    batch = collate([prompt])
    T = prompt.input_ids.numel()
    with vtprune.pruned(model, "transprune"), torch.no_grad():
        out = model(**batch, use_cache=True)
        stats = model.vtprune.stats
    lengths = [layer.keys.shape[-2] for layer in out.cache.layers]
    removed = [sum(img.n_tokens - expected_counts(img.n_tokens, family)[s] for img in stats.images)
               for s in range(len(CUTS))]
    assert lengths == [T] + [T - r for r in removed]


@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl"])
def test_generate_equals_slow_multi_cut_reference(models, family):
    model = models(family)
    batch = collate([make_prompt(model, family, 5, 2)])
    with vtprune.pruned(model, "transprune"), torch.no_grad():
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        stats = model.vtprune.stats
    tokens, first_logits = out.sequences[0, -STEPS:].tolist(), out.logits[0]
    ids = batch["input_ids"][0]
    kept = {layer: kept_sequence_positions(ids, model.config.image_token_id,
                                           [img.stages[s].kept_index for img in stats.images],
                                           [img.n_tokens for img in stats.images])
            for s, layer in enumerate(CUTS)}
    ref_tokens, ref_logits = slow_multi_cut_generate(model, merged_embeds(model, batch), kept, STEPS, renumber=True)
    assert tokens == ref_tokens
    torch.testing.assert_close(first_logits, ref_logits, atol=1e-5, rtol=0)


def test_batch_equals_each_prompt_alone(models):
    model = models("llava")
    prompts = [make_prompt(model, "llava", 3 + 4 * i, i) for i in range(3)]
    with vtprune.pruned(model, "transprune"), torch.no_grad():
        batched = model.generate(**collate(prompts), max_new_tokens=STEPS)[:, -STEPS:].tolist()
        batched_kept = _stats_stages(model.vtprune.stats)
        singles, single_kept = [], []
        for p in prompts:
            singles.append(model.generate(**collate([p]), max_new_tokens=STEPS)[0, -STEPS:].tolist())
            single_kept += _stats_stages(model.vtprune.stats)
    assert batched_kept == single_kept
    assert batched == singles
