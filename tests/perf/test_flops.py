"""Analytic FLOPs and KV bytes (vtprune.perf.flops) against counts written out by hand for the tiny models
of tests/conftest.py, and against the KV cache tensors a prefill actually leaves."""

import contextlib
import dataclasses

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import vtprune
from tests.conftest import collate, make_prompt
from vtprune.perf import flops as F
from vtprune.perf.timing import kv_cache_bytes

# The tiny config of tests/conftest.py, written out. Vision: D=32, M=64, 3 layers, patch 4 on 32 px -> 64 patches
# + CLS = 65 tokens per crop. LLM: d=64, m=128 (gated), 4 layers, 4 heads x 16 (d_q = 64), 2 KV heads (d_kv = 32),
# vocab 128. Projector: LLaVA 32 -> 64 -> 64 on 64 rows per crop; InternVL 2x2 shuffle: 4*32 = 128 -> 64 -> 64 on
# 16 rows per tile.
D, M, P, S = 32, 64, 64, 4
d, m, DQ, DKV, V = 64, 128, 64, 32, 128


def ref_vision_layer(p):
    return 2 * p * D * 3 * D + 2 * p * D * D + 4 * p * p * D + 2 * p * D * M * 2


PATCH_EMBED = 2 * P * (3 * S * S) * D


def ref_vision(crops, tokens=(65, 65, 65)):
    return crops * (PATCH_EMBED + sum(ref_vision_layer(p) for p in tokens))


def ref_projector(rows, d_in):
    return 2 * rows * d_in * d + 2 * rows * d * d


def ref_layer(n, c):
    return 2 * n * d * (DQ + 2 * DKV) + 2 * n * DQ * d + 4 * n * c * DQ + 2 * n * d * m * 3


LM_HEAD = 2 * d * V


def ref_prefill(tokens):
    return sum(ref_layer(n, n) for n in tokens) + LM_HEAD


def ref_decode(cache):
    return sum(ref_layer(1, c + 1) for c in cache) + LM_HEAD


KV_PER_TOKEN = 2 * 2 * 16 * 4  # keys + values, 2 KV heads x 16, fp32


def test_references_by_hand():
    # one vision layer on 65 tokens: 399360 (qkv) + 133120 (out) + 540800 (attention) + 532480 (MLP)
    assert ref_vision_layer(65) == 1_605_760
    assert PATCH_EMBED == 196_608 and ref_vision(1) == 5_013_888
    assert ref_layer(10, 10) == 73728 * 10 + 256 * 100  # 73728 n + 256 n c for this LLM


def sample(models, family, seed=0, text_len=5):
    model = models(family)
    return model, collate([make_prompt(model, family, text_len, seed)])


def pruned_stats(model, batch, name, **kw):
    with vtprune.pruned(model, name, **kw):
        with torch.no_grad():
            model(**batch)
        return model.vtprune.stats


def stages(stats):
    return [(s.stage, s.layer, s.tokens_in, s.tokens_out) for img in stats.images for s in img.stages]


def check(b, vision, projector, llm_tokens):
    expect = dict(vision=vision, projector=projector, llm_prefill=ref_prefill(llm_tokens),
                  decode_step=ref_decode(llm_tokens))
    assert b.to_dict() == {**expect, "prefill": vision + projector + expect["llm_prefill"]}


# ---------------------------------------------------------------------------------------------------------------
def test_shape_of_three_families(models):
    common = dict(vision_layers=3, vision_hidden=32, vision_mlp=64, vision_heads=2, patch=4, image=32, patches=64,
                  has_cls=True, projector_cls=False, llm_layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16,
                  ffn=128, gated=True, vocab=128)
    llava = F.Shape(**common, projector="mlp", projector_in=32, projector_pool=1)
    assert F.shape_of(models("llava")) == llava
    assert F.shape_of(models("llava_next")) == llava
    internvl = F.Shape(**common, projector="shuffle_mlp", projector_in=128, projector_pool=4)
    assert F.shape_of(models("internvl")) == internvl
    assert (llava.vision_tokens, llava.projector_rows, internvl.projector_rows) == (65, 64, 16)


def test_shape_of_real_archs_on_meta():
    from vtprune.perf.archs import build_arch

    s = F.shape_of(build_arch("internvl2-8b", device="meta"))
    assert (s.vision_layers, s.vision_hidden, s.vision_mlp, s.patches, s.projector_in, s.projector_pool) == (
        24, 1024, 4096, 1024, 4096, 4)
    assert (s.llm_layers, s.hidden, s.heads, s.kv_heads, s.head_dim, s.ffn, s.gated, s.vocab) == (
        32, 4096, 32, 8, 128, 14336, True, 92553)
    s = F.shape_of(build_arch("llava-1.5-7b", device="meta"))
    assert (s.vision_layers, s.patches, s.projector_rows, s.projector_in, s.kv_heads, s.vocab) == (
        24, 576, 576, 1024, 32, 32064)


def test_stage_functions_by_hand():
    shape = F.Shape(vision_layers=3, vision_hidden=32, vision_mlp=64, vision_heads=2, patch=4, image=32, patches=64,
                    has_cls=True, projector="mlp", projector_in=32, projector_pool=1, projector_cls=False,
                    llm_layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, gated=True, vocab=128)
    assert F.vision_flops(shape, 2) == ref_vision(2)
    assert F.vision_flops(shape, 3, [65, 20, 9]) == ref_vision(3, (65, 20, 9))
    assert F.projector_flops(shape, 7) == ref_projector(7, 32)
    assert F.llm_layer_flops(shape, 5, 11) == ref_layer(5, 11)
    assert F.llm_prefill_flops(shape, [9, 9, 4, 4]) == ref_prefill([9, 9, 4, 4])
    assert F.decode_step_flops(shape, [9, 9, 4, 4]) == ref_decode([9, 9, 4, 4])
    assert F.kv_bytes(shape, [9, 9, 4, 4], 2, batch=3) == 2 * 2 * 16 * 2 * 3 * 26
    plain = dataclasses.replace(shape, gated=False)  # up and down only
    assert F.llm_layer_flops(plain, 5, 11) == ref_layer(5, 11) - 2 * 5 * d * m
    with pytest.raises(ValueError, match="one token count per layer"):
        F.llm_prefill_flops(shape, [9, 9, 4])


def test_vanilla_llava(models):
    model, batch = sample(models, "llava")
    T = batch["input_ids"].shape[1]
    check(F.breakdown(model, batch), ref_vision(1), ref_projector(64, 32), [T] * 4)
    assert F.llm_tokens_per_layer(model, batch) == [T] * 4


def test_vanilla_next_crops_and_internvl_tiles(models):
    model, batch = sample(models, "llava_next", seed=2)
    h, w = batch["image_sizes"][0].tolist()
    crops = image_size_to_num_patches((h, w), model.config.image_grid_pinpoints, 32)  # the model's own count
    T = batch["input_ids"].shape[1]
    check(F.breakdown(model, batch), ref_vision(crops), ref_projector(crops * 64, 32), [T] * 4)

    model, batch = sample(models, "internvl", seed=1)  # seed 1: one image of 2 tiles
    tiles = batch["pixel_values"].shape[0]
    assert tiles == 2
    T = batch["input_ids"].shape[1]
    check(F.breakdown(model, batch), ref_vision(tiles), ref_projector(tiles * 16, 128), [T] * 4)


def test_pre_llm_method(models):
    model, batch = sample(models, "llava")
    stats = pruned_stats(model, batch, "random", keep=16)
    T = batch["input_ids"].shape[1]
    check(F.breakdown(model, batch, stats), ref_vision(1), ref_projector(64, 32), [T - 48] * 4)


def test_llm_stage_method(models):
    model, batch = sample(models, "llava")
    stats = pruned_stats(model, batch, "fastv", keep=16, layer=2)
    T = batch["input_ids"].shape[1]
    check(F.breakdown(model, batch, stats), ref_vision(1), ref_projector(64, 32), [T, T, T - 48, T - 48])


def test_vision_stage_method_llava(models):
    model, batch = sample(models, "llava")
    stats = pruned_stats(model, batch, "flowcut", keep=16)
    # feature layer 1 (hidden_states[-2] of 3 layers): one cut before vision layer 1, in patches of the crop
    assert stages(stats)[:2] == [("vision", 1, 64, 16), ("pre_llm", None, 64, 16)]
    T = batch["input_ids"].shape[1]
    check(F.breakdown(model, batch, stats), ref_vision(1, (65, 17, 17)), ref_projector(16, 32), [T - 48] * 4)


def test_vision_stage_method_internvl_tiles(models):
    model, batch = sample(models, "internvl", seed=1)  # 2 tiles, 32 LLM tokens
    stats = pruned_stats(model, batch, "flowcut", keep=8)
    # cut before vision layer 2 to 8 of 16 groups per tile = 32 of 64 patches; 2 tiles x 8 tokens reach the LLM
    assert stages(stats)[:2] == [("vision", 2, 64, 32), ("pre_llm", None, 32, 16)]
    T = batch["input_ids"].shape[1]
    check(F.breakdown(model, batch, stats), ref_vision(2, (65, 65, 33)), ref_projector(2 * 8, 128), [T - 16] * 4)


@pytest.mark.parametrize("method", [None, ("fastv", dict(keep=16, layer=2))])
def test_kv_bytes_match_the_cache(models, method):
    model, batch = sample(models, "llava")
    T = batch["input_ids"].shape[1]
    with vtprune.pruned(model, method[0], **method[1]) if method else contextlib.nullcontext():
        with torch.no_grad():
            cache = model(**batch, use_cache=True).cache
        stats = model.vtprune.stats if method else None
    tokens = F.llm_tokens_per_layer(model, batch, stats)
    assert tokens == ([T, T, T - 48, T - 48] if method else [T] * 4)
    analytic = F.kv_bytes(F.shape_of(model), tokens, 4)
    assert analytic == KV_PER_TOKEN * sum(tokens) == kv_cache_bytes(cache)


def test_one_sample_only(models):
    model = models("llava")
    batch = collate([make_prompt(model, "llava", 5, s) for s in (0, 1)])
    with pytest.raises(ValueError, match="batch of 1"):
        F.breakdown(model, batch)


def test_kv_bytes_after_evict_early_kv(models):
    """evict_early_kv cuts the cache of layers 0-1 to the tokens FastV keeps from layer 2 on."""
    model, batch = sample(models, "llava")
    T = batch["input_ids"].shape[1]
    with vtprune.pruned(model, "fastv", keep=16, layer=2, evict_early_kv=True), torch.no_grad():
        cache = model(**batch, use_cache=True).cache
        stats = model.vtprune.stats
    assert stats.evicted_early_kv
    assert F.llm_tokens_per_layer(model, batch, stats) == [T, T, T - 48, T - 48]  # what each layer computed
    assert F.cache_tokens_per_layer(model, batch, stats) == [T - 48] * 4
    assert F.kv_bytes(F.shape_of(model), [T - 48] * 4, 4) == KV_PER_TOKEN * 4 * (T - 48) == kv_cache_bytes(cache)
    b = F.breakdown(model, batch, stats)
    assert (b.llm_prefill, b.decode_step) == (ref_prefill([T, T, T - 48, T - 48]), ref_decode([T - 48] * 4))


def _vision_segments(model, inputs) -> dict[int, list[int]]:
    """Per vision block, the attention segment lengths the model itself uses (its cu_seqlens kwarg)."""
    seen, handles = {}, []
    for j, block in enumerate(model.model.visual.blocks):
        handles.append(block.register_forward_pre_hook(
            lambda mod, args, kwargs, j=j: seen.setdefault(j, torch.diff(kwargs["cu_seqlens"]).tolist()) and None,
            with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _linear_flops(module, rows: int) -> float:
    return sum(2.0 * rows * lin.in_features * lin.out_features
               for lin in module.modules() if isinstance(lin, torch.nn.Linear))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_vision_and_merger_flops_follow_the_models_own_segments_and_modules(models, family):
    """Windowed vs full blocks from the cu_seqlens each block really gets; the merger and every DeepStack merger
    from their Linear layers; the patch embedding from the Conv3d's kernel."""
    from tests.qwen_fixtures import make_qwen_prompt

    model = models(family)
    prompt = make_qwen_prompt(model, 3, seed=0, grids=[(12, 10)])  # 12 x 10 patches: edge windows on 2.5
    inputs = collate([prompt])
    segments = _vision_segments(model, inputs)
    visual, P = model.model.visual, 120
    per_block = _linear_flops(visual.blocks[0].attn, P) + _linear_flops(visual.blocks[0].mlp, P)
    expected = sum(per_block + 4.0 * sum(n * n for n in segments[j]) * model.config.vision_config.hidden_size
                   for j in range(len(visual.blocks)))
    conv = visual.patch_embed.proj
    expected += 2.0 * P * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.kernel_size[2] * conv.out_channels
    mergers = [visual.merger] + list(getattr(visual, "deepstack_merger_list", []))
    merger = sum(_linear_flops(mg, P // 4) for mg in mergers)
    got = F.breakdown(model, inputs)
    assert got.vision == pytest.approx(expected, rel=1e-12)
    assert got.projector == pytest.approx(merger, rel=1e-12)
    if family == "qwen2_5_vl":  # windowed blocks really are cheaper than full ones here
        assert len(set(map(tuple, segments.values()))) == 2
    else:
        assert len(mergers) == 4


@pytest.mark.parametrize("kv_mode", ["none", "evict", "mixed"])
def test_kv_bytes_of_zipvl_caches(models, kv_mode):
    """perf's KV bytes of a ZipVL cache: every token (none), each layer's kept tokens (evict: p_l of the one
    sample), the packed chunks: 4 bits for the kept tokens, 2 for the rest, plus per-group statistics (mixed)."""
    from vtprune.perf.suite import _reported

    model, batch = sample(models, "llava")
    T = batch["input_ids"].shape[1]
    with vtprune.pruned(model, "zipvl", tau=0.9, kv_mode=kv_mode), torch.no_grad():
        cache = model(**batch, use_cache=True).cache
        stats = model.vtprune.stats
    kept = [ps[0] for _, ps in sorted(stats.reports["zipvl"].kept.items())]
    H, hd = 2, DKV // 2
    codes = [2 * H * (p * hd * 4 // 8 + (T - p) * hd * 2 // 8) for p in kept]
    stats_bytes = [4 * (2 * 2 * H * hd + 2 * T + H * hd) + -(-T // 8) for _ in kept]
    expected = {"none": KV_PER_TOKEN * 4 * T, "evict": KV_PER_TOKEN * sum(kept),
                "mixed": sum(codes) + sum(stats_bytes)}[kv_mode]
    assert kv_cache_bytes(cache) == expected
    assert abs(_reported(stats, "attention_flop_reduction") - (1 - sum((p / T) ** 2 for p in kept) / 4)) < 1e-12
