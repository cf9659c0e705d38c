"""VFlowOpt (spec §1.4-1.9, 1.13): the importance map, the stage-0 prune + recycle, the two LLM stages, the
layer-averaged budget, the KV cache per segment and decoding, against references written from the formulas on an
eager copy of the tiny models (its vision ``output_attentions``), never from vtprune's code.

Every test passes every hyperparameter (threshold, cell, retention, llm_ratios, llm_layers), so no reference
depends on the method's default interpolation. The tiny LLMs have L = 4 layers; the LLM stages run before
layers (1, 3)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import vtprune
from vtprune.adapters import VisualSpan, get_adapter

from ..conftest import collate, make_prompt
from ..helpers import kept_sequence_positions, merged_embeds, slow_multi_cut_generate

L, K1, K2 = 4, 1, 3
LAYERS = (K1, K2)
NOMINAL = {"llava": 64, "llava_next": 64, "internvl": 16}
FEATURE_LAYER = {"llava": 1, "llava_next": 1, "internvl": 2}  # -2 of 3 CLIP layers; -1 of 3 InternVL layers
STEPS = 6
BASE = {"threshold": 2.0, "cell": 3.0, "llm_layers": LAYERS}


# --- references --------------------------------------------------------------------------------------------
def _image_runs(ids: torch.Tensor, image_id: int) -> list[tuple[int, int, int]]:
    """(sample, start, length) of every image in batch order (one contiguous run of the image token per image)."""
    out = []
    for b in range(ids.shape[0]):
        pos = torch.nonzero(ids[b] == image_id).flatten().tolist()
        start = prev = None
        for p in pos:
            if start is None:
                start = prev = p
            elif p == prev + 1:
                prev = p
            else:
                out.append((b, start, prev - start + 1))
                start = prev = p
        if start is not None:
            out.append((b, start, prev - start + 1))
    return out


def _context_relevance(attn: torch.Tensor, threshold: float) -> tuple[torch.Tensor, list[bool]]:
    """attn [C, H, S, S] (CLS first) -> ([C, P] c per patch, per crop whether the global set G is non-empty)."""
    patches = attn[:, :, 1:, 1:].float()
    A = (patches / patches.sum(-1, keepdim=True)).mean(1)  # rows renormalised over patches, then the head mean
    out, non_empty = [], []
    for a in A:
        r = a.mean(0)  # r_j: column mean
        G = r > threshold * r.mean()
        out.append(a[G].mean(0) if bool(G.any()) else r)
        non_empty.append(bool(G.any()))
    return torch.stack(out), non_empty


def _internvl_tile_tokens(model) -> tuple[torch.Tensor, torch.Tensor]:
    """([16, 4] patch indices 0..63 feeding each token of a tile, [16, 2] (row, col) of each token on the 4x4
    grid), from the model's own pixel shuffle run on patch indices (as ``get_image_features`` reshapes them)."""
    side = 8
    ids = torch.arange(side * side, dtype=torch.float64).reshape(1, side, side, 1)
    src = model.model.pixel_shuffle(ids, scale_factor=model.config.downsample_ratio)
    src = src.reshape(-1, src.shape[-1]).round().long()
    rows, cols = src // side // 2, src % side // 2
    assert bool((rows == rows[:, :1]).all()) and bool((cols == cols[:, :1]).all())  # each token: one 2x2 block
    return src, torch.stack([rows[:, 0], cols[:, 0]], 1)


def image_scores(eager, batch, family, threshold):
    """Per image (batch order): (scores [N], grid [N, 3] (grid, row, col), [N] embeddings X, G non-empty flags)."""
    ids = batch["input_ids"]
    runs = _image_runs(ids, eager.config.image_token_id)
    X = merged_embeds(eager, batch)
    pv = batch["pixel_values"]
    out, tile = [], 0
    with torch.no_grad():
        for i, (b, start, n) in enumerate(runs):
            feats = X[b, start:start + n]
            layer = FEATURE_LAYER[family]
            if family == "llava":
                attn = eager.model.vision_tower(pv[i:i + 1], output_attentions=True).attentions[layer]
                c, flags = _context_relevance(attn, threshold)
                s = c[0]  # token j = patch j of the single 8x8 crop
                j = torch.arange(n)
                grid = torch.stack([torch.zeros_like(j), j // 8, j % 8], 1)
            elif family == "internvl":
                tiles = n // 16
                attn = eager.model.vision_tower(pv[tile:tile + tiles], output_attentions=True).attentions[layer]
                tile += tiles
                c, flags = _context_relevance(attn, threshold)  # [tiles, 64]
                src, rc = _internvl_tile_tokens(eager)
                s = torch.cat([c[t][src].sum(1) for t in range(tiles)])  # each token sums its 4 patches
                grid = torch.cat([torch.cat([torch.full((16, 1), t), rc], 1) for t in range(tiles)])
            else:  # llava_next: the model's own packing (adapter facts), newline tokens score 1.0
                sizes = [tuple(int(v) for v in s) for s in batch["image_sizes"].tolist()]
                crops = image_size_to_num_patches(sizes[i], eager.config.image_grid_pinpoints,
                                                  eager.config.vision_config.image_size)
                attn = eager.model.vision_tower(pv[i, :crops], output_attentions=True).attentions[layer]
                c, flags = _context_relevance(attn, threshold)  # [crops, 64]
                span = VisualSpan(sample=b, image=i, index_in_sample=0, start=start, length=n)
                # the model's own packing (pack_image_features on vision indices): crop * 65 + position (CLS = 0),
                # -1 for newline tokens
                src = get_adapter(eager).token_sources(span, sizes)[:, 0]
                per_position = torch.cat([torch.zeros(c.shape[0], 1), c], 1).reshape(-1)
                s = torch.where(src >= 0, per_position[src.clamp(min=0)], torch.ones(()))
                # grid 0: the base crop (8x8, token q at (q // 8, q % 8)); grid 1: the canvas, rows of W tokens
                # counting the newline column (spec §1.7: W = canvas row width INCLUDING the newline)
                assert bool((src[:64] // 65 == 0).all()) and bool((src[64:] // 65 != 0).all())
                newlines = torch.nonzero(src < 0).flatten()
                W = int(newlines[0]) - 64 + 1
                assert bool((torch.diff(newlines) == W).all()) and int(newlines[-1]) == n - 1
                q = torch.arange(n)
                grid = torch.stack([(q >= 64).long(), torch.where(q < 64, q // 8, (q - 64) // W),
                                    torch.where(q < 64, q % 8, (q - 64) % W)], 1)
            assert s.numel() == n
            out.append((s, grid, feats, flags))
    return out


def _top(s: torch.Tensor, among: list[int], k: int) -> list[int]:
    """The k of ``among`` with the largest s (ties: lower index), sorted."""
    order = sorted(among, key=lambda j: (-float(s[j]), j))
    return sorted(order[:k])


def _target(n: int, family: str, keep=None, ratio=None) -> float | None:
    """Requested average visual tokens per LLM layer: keep (scaled for anyres images, round half up) or N (1-ratio)."""
    if ratio is not None:
        return n * (1 - ratio)
    if keep is not None:
        nominal = NOMINAL[family]
        return float(keep if n == nominal else max(1, min(n, math.floor(n * keep / nominal + 0.5))))
    return None


def reference_stages(eager, batch, family, threshold, cell, retention, llm_ratios, llm_layers=LAYERS, keep=None,
                     ratio=None, recycle=True):
    """Per image: {"stages": [kept0, kept1, kept2] (original indices 0..N-1), "recycled": {rep: values [D]},
    "X": [N, D], "global": flags, "target": float | None}."""
    assert tuple(llm_layers) == LAYERS
    result = []
    for s, grid, X, flags in image_scores(eager, batch, family, threshold):
        N = s.numel()
        n_drop = round(N * (1 - retention))
        recycled = {}
        if not recycle:
            kept0 = _top(s, list(range(N)), max(1, N - n_drop))
        else:
            n_pruned = min(N - 1, n_drop + math.floor(N / cell ** 2))
            pruned = sorted(range(N), key=lambda j: (float(s[j]), j))[:n_pruned]
            cells = {}
            for j in pruned:
                g, row, col = (int(v) for v in grid[j])
                cells.setdefault((g, math.floor(row / cell), math.floor(col / cell)), []).append(j)
            for members in cells.values():
                m = torch.tensor(members)
                w = s[m] / s[m].sum()
                rep = members[int(torch.argmax(s[m]))]
                recycled[rep] = (w[:, None] * X[m].float()).sum(0)
            kept0 = sorted(set(range(N)) - set(pruned) | set(recycled))
        n0 = len(kept0)
        n1 = n0 - round(n0 * (1 - llm_ratios[0]))
        kept1 = _top(s, kept0, n1)
        target = _target(N, family, keep, ratio)
        if target is None:
            n2 = n1 - round(n1 * (1 - llm_ratios[1]))
        else:
            n2 = min(max(round((L * target - K1 * n0 - (K2 - K1) * n1) / (L - K2)), 1), n1)
        kept2 = _top(s, kept1, n2)
        result.append({"stages": [kept0, kept1, kept2], "recycled": recycled, "X": X, "global": flags,
                       "target": target})
    return result


def _stats_stages(stats):
    return [[st.kept_index for st in img.stages] for img in stats.images]


class _Capture:
    """Forward pre-hook on the language model (registered after vtprune's): the first call's inputs_embeds."""

    def __init__(self, model):
        self.embeds = None
        self.handle = model.model.language_model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if self.embeds is None:
            self.embeds = kwargs["inputs_embeds"].detach().clone()

    def remove(self):
        self.handle.remove()


def _run(model, batch, generate=False, **kwargs):
    """(stats, captured LLM input of the prefill, output) of one pruned forward (or greedy generate)."""
    with vtprune.pruned(model, "vflowopt", **kwargs), torch.no_grad():
        cap = _Capture(model)
        try:
            if generate:
                out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                                     output_logits=True)
            else:
                out = model(**batch, use_cache=True)
        finally:
            cap.remove()
        stats = model.vtprune.stats
    return stats, cap.embeds, out


# --- 1. importance and stage 0 -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl"])
@pytest.mark.parametrize("threshold", [1.0, 1e6])  # G non-empty / empty (c = r)
def test_stage0_keeps_the_top_and_recycles_dropped_cells(models, eager_copy, family, threshold):
    model = models(family)
    batch = collate([make_prompt(model, family, 5, 1)])
    params = {"threshold": threshold, "cell": 3.0, "retention": 0.5, "llm_ratios": (0.75, 0.5), "llm_layers": LAYERS}
    stats, embeds, _ = _run(model, batch, **params)
    ref = reference_stages(eager_copy(family), batch, family, **params)
    flags = [f for r in ref for f in r["global"]]
    assert all(flags) if threshold == 1.0 else not any(flags)
    if threshold == 1.0:  # the global set does change the decision here (c != r)
        other = reference_stages(eager_copy(family), batch, family, **dict(params, threshold=1e6))
        assert [r["stages"][0] for r in other] != [r["stages"][0] for r in ref]
    assert [img.stages[0].stage for img in stats.images] == ["pre_llm"] * len(ref)
    assert [img.stages[0].kept_index for img in stats.images] == [r["stages"][0] for r in ref]
    (r,) = ref
    assert len(r["recycled"]) > 1 and any(j in r["recycled"] for j in r["stages"][0])
    # the LLM input: text unchanged, kept tokens unchanged, each cell's score-weighted mean at its best member
    ids = batch["input_ids"][0]
    full = merged_embeds(model, batch)[0]
    keep = kept_sequence_positions(ids, model.config.image_token_id, [r["stages"][0]], [r["X"].shape[0]])
    expected = full[keep].clone()
    start = int(torch.nonzero(ids == model.config.image_token_id)[0, 0])
    plain = torch.ones(keep.numel(), dtype=torch.bool)
    for row, j in enumerate(r["stages"][0]):
        if j in r["recycled"]:
            expected[start + row] = r["recycled"][j]
            plain[start + row] = False
    assert embeds.shape[1] == keep.numel()
    torch.testing.assert_close(embeds[0], expected, atol=1e-5, rtol=1e-5)
    # text and the kept rows that are not recycled are the model's own embeddings, bit for bit
    assert torch.equal(embeds[0][plain], full[keep][plain])
    assert not torch.allclose(embeds[0][~plain], full[keep][~plain])  # recycling did change those rows


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_stage0_without_recycling_is_top_k(models, eager_copy, family):
    model = models(family)
    batch = collate([make_prompt(model, family, 5, 1)])
    params = {"threshold": 1.0, "cell": 3.0, "retention": 0.4, "llm_ratios": (0.75, 0.5), "llm_layers": LAYERS}
    stats, embeds, _ = _run(model, batch, recycle=False, **params)
    (r,) = reference_stages(eager_copy(family), batch, family, recycle=False, **params)
    N = r["X"].shape[0]
    assert len(r["stages"][0]) == N - round(N * 0.6)
    assert _stats_stages(stats) == [r["stages"]]
    keep = kept_sequence_positions(batch["input_ids"][0], model.config.image_token_id, [r["stages"][0]], [N])
    assert torch.equal(embeds[0], merged_embeds(model, batch)[0, keep])


# --- 2. the LLM stages -------------------------------------------------------------------------------------------
STAGE_CASES = {  # family: (budget kwargs, retention, llm_ratios)
    "llava-keep": ("llava", {"keep": 24}, 0.5, (0.75,)),
    "llava-none": ("llava", {}, 0.5, (0.75, 0.5)),
    "next-ratio": ("llava_next", {"ratio": 0.6}, 0.55, (0.8,)),
    "next-none": ("llava_next", {}, 0.6, (0.7, 0.6)),
    "internvl-keep": ("internvl", {"keep": 8}, 0.7, (0.7,)),
    "internvl-none": ("internvl", {}, 0.7, (0.8, 0.5)),
}


@pytest.mark.parametrize("case", list(STAGE_CASES))
@pytest.mark.parametrize("batch_size", [1, 3])
def test_llm_stages_drop_the_lowest_of_the_same_map(models, eager_copy, case, batch_size):
    family, budget, retention, ratios = STAGE_CASES[case]
    model = models(family)
    prompts = [make_prompt(model, family, 3 + 2 * i, i) for i in range(batch_size)]
    batch = collate(prompts)
    params = dict(BASE, retention=retention, llm_ratios=ratios)
    stats, _, _ = _run(model, batch, **budget, **params)
    ref = reference_stages(eager_copy(family), batch, family, **params, **budget)
    assert [[(st.stage, st.layer) for st in img.stages] for img in stats.images] == \
        [[("pre_llm", None), ("llm", K1), ("llm", K2)]] * len(ref)
    assert _stats_stages(stats) == [r["stages"] for r in ref]
    for img, r in zip(stats.images, ref):
        assert img.stages[-1].note is None
        assert [st.tokens_out for st in img.stages] == [len(k) for k in r["stages"]]
        assert r["stages"][2] != r["stages"][1] and r["stages"][1] != r["stages"][0]  # both stages do drop
        for a, b in zip(r["stages"], r["stages"][1:]):
            assert set(b) <= set(a)


# --- 3. the layer-averaged budget ----------------------------------------------------------------------------
BUDGET_CASES = {  # family: [(budget kwargs, retention, r1)] -- settings under which the schedule can meet them
    "llava": [({"keep": 16}, 0.3, 0.75), ({"keep": 32}, 0.6, 0.8), ({"ratio": 0.6}, 0.5, 0.75)],
    "llava_next": [({"keep": 16}, 0.3, 0.75), ({"keep": 32}, 0.6, 0.8)],
    "internvl": [({"keep": 6}, 0.4, 0.7), ({"keep": 10}, 0.8, 0.75), ({"ratio": 0.5}, 0.55, 0.75)],
}


@pytest.mark.parametrize("family", list(BUDGET_CASES))
@pytest.mark.parametrize("batch_size", [1, 3])
def test_equivalent_tokens_meet_the_average_budget(models, family, batch_size):
    model = models(family)
    batch = collate([make_prompt(model, family, 3 + 2 * i, i) for i in range(batch_size)])
    for budget, retention, r1 in BUDGET_CASES[family]:
        stats, _, _ = _run(model, batch, **budget, **BASE, retention=retention, llm_ratios=(r1,))
        for img in stats.images:
            n0, n1, n2 = (st.tokens_out for st in img.stages)
            target = _target(img.n_tokens, family, **budget)
            assert img.stages[-1].note is None, (budget, img.stages[-1].note)
            assert img.equivalent_tokens == pytest.approx((K1 * n0 + (K2 - K1) * n1 + (L - K2) * n2) / L)
            assert abs(img.equivalent_tokens - target) <= 1.0, (budget, img.n_tokens, img.equivalent_tokens, target)
            assert n2 == min(max(round((L * target - K1 * n0 - (K2 - K1) * n1) / (L - K2)), 1), n1)


# --- 4. the KV cache of each segment ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl"])
def test_kv_cache_of_each_segment_holds_its_tokens(models, family):
    model = models(family)
    prompt = make_prompt(model, family, 5, 1)
    T = prompt.input_ids.numel()
    stats, _, out = _run(model, collate([prompt]), **BASE, retention=0.6, llm_ratios=(0.75, 0.5))
    N = sum(img.n_tokens for img in stats.images)
    n0, n1, n2 = (sum(img.stages[s].tokens_out for img in stats.images) for s in range(3))
    assert N > n0 > n1 > n2
    lengths = [layer.keys.shape[-2] for layer in out.cache.layers]
    assert lengths == [T - (N - n0)] + [T - (N - n1)] * (K2 - K1) + [T - (N - n2)]


# --- 5. decoding -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl"])
def test_generate_equals_slow_multi_cut_reference(models, family):
    """Stage 0 renumbers the pruned LLM input 0..len-1; stages 1 and 2 gather those positions; generated tokens
    continue after the pruned input. The reference recomputes the full pruned forward per step, no cache."""
    model = models(family)
    batch = collate([make_prompt(model, family, 5, 2)])
    keep = {"llava": 24, "llava_next": 24, "internvl": 8}[family]
    stats, embeds, out = _run(model, batch, generate=True, keep=keep, **BASE, retention=0.55, llm_ratios=(0.75,))
    tokens, first_logits = out.sequences[0, -STEPS:].tolist(), out.logits[0]
    ids = batch["input_ids"][0]
    image_id = model.config.image_token_id
    kept0 = [img.stages[0].kept_index for img in stats.images]
    pruned_ids = ids[kept_sequence_positions(ids, image_id, kept0, [img.n_tokens for img in stats.images])]
    assert embeds.shape[1] == pruned_ids.numel()
    rows = {}
    for s, layer in ((1, K1), (2, K2)):
        ranks = [[k0.index(j) for j in img.stages[s].kept_index] for img, k0 in zip(stats.images, kept0)]
        rows[layer] = kept_sequence_positions(pruned_ids, image_id, ranks, [len(k) for k in kept0])
    ref_tokens, ref_logits = slow_multi_cut_generate(model, embeds, rows, STEPS, renumber=False)
    assert tokens == ref_tokens
    torch.testing.assert_close(first_logits, ref_logits, atol=1e-4, rtol=1e-4)


# --- 6. batch == each prompt alone ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_batch_equals_each_prompt_alone(models, family):
    model = models(family)
    prompts = [make_prompt(model, family, 3 + 4 * i, i) for i in range(3)]
    params = dict(keep=24, **BASE, retention=0.55, llm_ratios=(0.75,))
    with vtprune.pruned(model, "vflowopt", **params), torch.no_grad():
        batched = model.generate(**collate(prompts), max_new_tokens=STEPS, do_sample=False)[:, -STEPS:].tolist()
        batched_kept = _stats_stages(model.vtprune.stats)
        singles, single_kept = [], []
        for p in prompts:
            singles.append(model.generate(**collate([p]), max_new_tokens=STEPS, do_sample=False)[0, -STEPS:].tolist())
            single_kept += _stats_stages(model.vtprune.stats)
    assert batched_kept == single_kept
    assert batched == singles


# --- 7. a budget the schedule cannot meet -----------------------------------------------------------------------
def test_unreachable_budget_warns_and_notes(models):
    model = models("llava")
    batch = collate([make_prompt(model, "llava", 4, 0)])
    with pytest.warns(UserWarning, match="vflowopt"):
        vtprune.prune(model, "vflowopt", keep=56, **BASE, retention=0.2, llm_ratios=(0.75,))
    try:
        with torch.no_grad():
            model(**batch)
        img = model.vtprune.stats.images[0]
    finally:
        vtprune.unprune(model)
    _n0, n1, n2 = (st.tokens_out for st in img.stages)
    assert n2 == n1  # r2 clipped at 1
    assert img.stages[-1].note is not None and "budget" in img.stages[-1].note
    assert img.equivalent_tokens < 56 - 1
