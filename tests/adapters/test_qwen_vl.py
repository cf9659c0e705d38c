"""Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE (issue 25, spec qwen_vl.md): exactness of cuts, M-RoPE positions, DeepStack.

References are built from the model's own pieces (vision features, ``get_rope_index``, the language model called
with explicit ``[3, 1, T]`` position ids), never from vtprune code."""

from __future__ import annotations

import pytest
import torch

import vtprune
from vtprune.errors import PruneError

from ..conftest import QWEN_FAMILIES, build_model, collate, make_prompt
from ..qwen_fixtures import IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START, make_qwen_prompt, row_width

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 4


def _features(model, batch):
    """(merged features [N, D], per-layer DeepStack features [N, D] or None) in batch order, from the model."""
    with torch.no_grad():
        out = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    feats = torch.cat(list(out.pooler_output))
    deep = getattr(out, "deepstack_features", None)
    return feats, ([torch.cat(list(f)) for f in deep] if deep else None)


def _rope_positions(model, batch) -> torch.Tensor:
    """[3, B, T] the model's own 3-D positions of the unpruned prompt."""
    pos, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                        image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    return pos


def _r1_positions(ids: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[3, 1, n] spec §2.7 "R1" for one sample, token by token: a kept image token keeps its offset from its image's
    start, which follows the (renumbered) <vision_start>; a text token comes right after the largest position
    before it."""
    out, top, shift = [], None, 0
    for i in range(ids.numel()):
        if ids[i] == IMAGE_TOKEN and (i == 0 or ids[i - 1] != IMAGE_TOKEN):
            shift = int(pos[0, 0, i]) - (top + 1)  # the image starts right after <vision_start>
        if not keep[i]:
            continue
        if ids[i] == IMAGE_TOKEN:
            p = pos[:, 0, i] - shift
        else:
            p = torch.full((3,), int(pos[0, 0, i]) if top is None else top + 1)
        out.append(p)
        top = max(int(p.max()), top if top is not None else -1)
    return torch.stack(out, 1)[:, None]


def _reference_kept(model, batch, kept: list[int], steps: int, renumber: bool = False):
    """One sample fed only the kept tokens' embeddings (text + kept visual) with their original 3-D positions (or
    R1-renumbered ones), and (Qwen3) the kept rows of every DeepStack feature; greedy decode continues from the
    unpruned positions (renumbered: from the last renumbered one). Returns (prefill logits [V], greedy tokens)."""
    ids = batch["input_ids"][0]
    feats, deep = _features(model, batch)
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
        emb[ids == IMAGE_TOKEN] = feats
        visual = torch.nonzero(ids == IMAGE_TOKEN).flatten()
        keep = ids != IMAGE_TOKEN
        keep[visual[torch.tensor(kept, dtype=torch.long)]] = True
        full = _rope_positions(model, batch)
        pos = _r1_positions(ids, full, keep) if renumber else full[:, :, keep]
        extra = {}
        if deep is not None:
            extra = dict(visual_pos_masks=(ids[keep] == IMAGE_TOKEN)[None],
                         deepstack_visual_embeds=[f[torch.tensor(kept, dtype=torch.long)] for f in deep])
        lm = model.model.language_model
        out = lm(inputs_embeds=emb[keep][None], position_ids=pos, attention_mask=torch.ones(1, int(keep.sum())),
                 use_cache=True, **extra)
        logits = model.lm_head(out.last_hidden_state[:, -1])[0]
        tokens, cache, last = [int(logits.argmax())], out.cache, (pos if renumber else full)[:, :, -1:]
        for step in range(steps - 1):
            nxt = model.get_input_embeddings()(torch.tensor([[tokens[-1]]]))
            n = int(keep.sum()) + step + 1
            out = lm(inputs_embeds=nxt, position_ids=last + 1 + step, attention_mask=torch.ones(1, n), cache=cache,
                     use_cache=True)
            cache = out.cache
            tokens.append(int(model.lm_head(out.last_hidden_state[:, -1]).argmax()))
    return logits, tokens


@pytest.fixture(scope="module")
def qwen(models):
    return lambda family: models(family)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_ratio0_and_unprune_are_bit_identical_and_rope_deltas_untouched(qwen, family):
    model = qwen(family)
    batch = collate([make_prompt(model, family, 3 + 4 * i, seed=i, n_images=i) for i in range(3)])
    with torch.no_grad():
        ref = model(**batch).logits
        deltas = model.model.rope_deltas.clone()
        model.model.rope_deltas = None
        with vtprune.pruned(model, "fastv", ratio=0.0):
            assert torch.equal(model(**batch).logits, ref)
        assert torch.equal(model.model.rope_deltas, deltas)
        with vtprune.pruned(model, "fastv", ratio=0.5, layer=1):
            model(**batch)
            assert [i.kept < i.n_tokens for i in model.vtprune.stats.images] == [True] * 3
        assert torch.equal(model.model.rope_deltas, deltas)  # the model's own value: vtprune never writes it
        assert torch.equal(model(**batch).logits, ref)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_pre_llm_cut_equals_kept_tokens_with_original_3d_positions(qwen, family):
    model = qwen(family)
    batch = collate([make_prompt(model, family, 5, seed=3, n_images=2)])
    with vtprune.pruned(model, "random", ratio=0.5, positions="original", seed=1), torch.no_grad():
        logits = model(**batch).logits[0, -1]
        images = model.vtprune.stats.images
        kept = [i for img in images for i in _offset(img, images)]
        tokens = model.generate(**batch, max_new_tokens=STEPS, do_sample=False)[0, -STEPS:].tolist()
        assert [img.kept_index for img in model.vtprune.stats.images] == [img.kept_index for img in images]
    assert 0 < len(kept) < sum(i.n_tokens for i in images)
    ref_logits, ref_tokens = _reference_kept(model, batch, kept, STEPS)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert tokens == ref_tokens


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_renumber_is_r1_kept_images_keep_offsets_text_restarts_after_the_largest(qwen, family):
    model = qwen(family)
    batch = collate([make_prompt(model, family, 4, seed=2, n_images=2)])
    with vtprune.pruned(model, "random", ratio=0.6, positions="renumber", seed=3), torch.no_grad():
        logits = model(**batch).logits[0, -1]
        images = model.vtprune.stats.images
        kept = [i for img in images for i in _offset(img, images)]
        tokens = model.generate(**batch, max_new_tokens=STEPS, do_sample=False)[0, -STEPS:].tolist()
    ids = batch["input_ids"][0]
    keep = ids != IMAGE_TOKEN
    keep[torch.nonzero(ids == IMAGE_TOKEN).flatten()[torch.tensor(kept)]] = True
    r1, orig = _r1_positions(ids, _rope_positions(model, batch), keep), _rope_positions(model, batch)[:, :, keep]
    assert not torch.equal(r1, orig)  # this selection cut an image's last row / column: text positions moved
    ref_logits, ref_tokens = _reference_kept(model, batch, kept, STEPS, renumber=True)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert tokens == ref_tokens


def _offset(img, images):
    """Kept indices of ``img`` as indices into the sample's visual tokens (images before it shift them)."""
    before = sum(i.n_tokens for i in images if i.sample == img.sample and i.image < img.image)
    return [before + k for k in img.kept_index]


def _deepstack_reference(model, batch, kept: list[int], cut: int, skip_add_at: int | None = None) -> torch.Tensor:
    """Last-token logits of a layer-by-layer run: DeepStack feature k added to every visual token after layer k
    (the kept ones' own rows after the cut before layer ``cut``); ``skip_add_at`` leaves one add out."""
    ids = batch["input_ids"][0]
    feats, deep = _features(model, batch)
    lm = model.model.language_model
    with torch.no_grad():
        h = model.get_input_embeddings()(ids)[None]
        vis = ids == IMAGE_TOKEN
        h[0, vis] = feats
        pos, rows = _rope_positions(model, batch), torch.arange(int(vis.sum()))
        keep = torch.ones_like(vis)
        for layer, block in enumerate(lm.layers):
            if layer == cut:
                keep = ~vis
                keep[torch.nonzero(vis).flatten()[torch.tensor(kept, dtype=torch.long)]] = True
                h, rows = h[:, keep], torch.tensor(kept, dtype=torch.long)
            h = block(h, attention_mask=None, position_embeddings=lm.rotary_emb(h, pos[:, :, keep]))
            if layer < len(deep) and layer != skip_add_at:
                h[0, vis[keep]] = h[0, vis[keep]] + deep[layer][rows]
        return model.lm_head(lm.norm(h))[0, -1]


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_llm_cut_before_a_deepstack_layer_adds_each_kept_tokens_own_feature(qwen, family):
    model = qwen(family)
    assert len(model.config.vision_config.deepstack_visual_indexes) == 3
    batch = collate([make_prompt(model, family, 4, seed=1, n_images=2)])
    with vtprune.pruned(model, "fastv", ratio=0.5, layer=2), torch.no_grad():
        logits = model(**batch).logits[0, -1]
        images = model.vtprune.stats.images
    kept = [i for img in images for i in _offset(img, images)]
    assert 0 < len(kept) < sum(i.n_tokens for i in images)
    torch.testing.assert_close(logits, _deepstack_reference(model, batch, kept, cut=2), atol=1e-5, rtol=0)
    wrong = _deepstack_reference(model, batch, kept, cut=2, skip_add_at=2)  # the reference sees the feature
    assert (wrong - logits).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_deepstack_take_over_without_a_cut_is_bit_identical(qwen, family):
    model = qwen(family)
    batch = collate([make_prompt(model, family, 3 + 4 * i, seed=i, n_images=i) for i in range(3)])
    with torch.no_grad():
        ref = model(**batch).logits
        with vtprune.pruned(model, "random", keep=12):  # keeps every token (images have 4..12): hooks, no cut
            out = model(**batch).logits
            assert all(i.kept == i.n_tokens for i in model.vtprune.stats.images)
    assert torch.equal(out, ref)


def _generate(model, prompts, **kwargs):
    with torch.no_grad():
        out = model.generate(**collate(prompts), max_new_tokens=STEPS, do_sample=False, **kwargs)
    return out[:, -STEPS:].tolist()


@pytest.mark.parametrize("family", QWEN_FAMILIES)
@pytest.mark.parametrize("method", ["fastv", "random"])
def test_batch_of_0_1_2_images_equals_each_alone_and_cache_equals_recompute(qwen, family, method):
    model = qwen(family)
    prompts = [make_prompt(model, family, 2 + 3 * i, seed=i, n_images=n) for i, n in enumerate((1, 0, 2))]
    with vtprune.pruned(model, method, ratio=0.5):
        batched = _generate(model, prompts)
        kept = [(i.sample, i.kept_index) for i in model.vtprune.stats.images]
        singles, kept_single = [], []
        for b, p in enumerate(prompts):
            singles.append(_generate(model, [p])[0])
            stats = model.vtprune.stats
            kept_single += [(b, i.kept_index) for i in stats.images] if stats is not None else []
        if method == "random":  # scores from the image alone: a full prefill per step keeps the same tokens
            assert _generate(model, prompts, use_cache=False) == batched
    assert batched == singles and kept == kept_single
    assert [s for s, _ in kept] == [0, 2, 2]


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_beams_keep_one_layout_per_prompt(qwen, family):
    model = qwen(family)
    prompts = [make_prompt(model, family, 2 + 3 * i, seed=i, n_images=1) for i in range(2)]
    with vtprune.pruned(model, "fastv", ratio=0.5), torch.no_grad():
        out = model.generate(**collate(prompts), max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
        images = model.vtprune.stats.images
    assert out.shape[0] == 4 and len(images) == 4
    assert images[0].kept_index == images[1].kept_index and images[2].kept_index == images[3].kept_index


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_keep_is_per_image_capped_and_an_error_above_every_image(qwen, family):
    model = qwen(family)
    prompt = make_prompt(model, family, 3, seed=0, n_images=2)  # grids (4, 6) and (8, 4): 6 and 8 tokens
    with vtprune.pruned(model, "random", keep=7), torch.no_grad():
        model(**collate([prompt]))
        assert [(i.n_tokens, i.kept) for i in model.vtprune.stats.images] == [(6, 6), (8, 7)]
    with vtprune.pruned(model, "random", keep=9), torch.no_grad():
        with pytest.raises(PruneError, match="keep=9 is more than every image"):
            model(**collate([prompt]))
    assert not hasattr(model, "vtprune")


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_videos_pass_through_untouched(qwen, family):
    model = qwen(family)
    vc = model.config.vision_config
    g = torch.Generator().manual_seed(0)
    frames, h, w = 2, 4, 4
    ids = [1, 5, 6, VISION_START] + [VIDEO_TOKEN] * (frames // vc.temporal_patch_size * h * w // 4) + [VISION_END, 7]
    image = make_qwen_prompt(model, 2, seed=4, grids=[(4, 6)])
    video = dict(pixel_values_videos=torch.randn(frames // vc.temporal_patch_size * h * w, row_width(model), generator=g),
                 video_grid_thw=torch.tensor([[frames // vc.temporal_patch_size, h, w]]))
    only_video = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      mm_token_type_ids=torch.tensor([[2 if t == VIDEO_TOKEN else 0 for t in ids]]), **video)
    both = collate([image])
    both["input_ids"] = torch.cat([torch.tensor([ids]), both["input_ids"]], 1)
    both["attention_mask"] = torch.ones_like(both["input_ids"])
    both["mm_token_type_ids"] = (both["input_ids"] == IMAGE_TOKEN).long() + 2 * (both["input_ids"] == VIDEO_TOKEN).long()
    both.update(video)
    with torch.no_grad():
        ref = model(**only_video).logits
        with vtprune.pruned(model, "fastv", ratio=0.5):
            assert torch.equal(model(**only_video).logits, ref)  # no image: the forward is untouched
            assert model.vtprune.stats is None
            out = model(**both).logits
            (img,) = model.vtprune.stats.images
    assert img.n_tokens == 6 and out.shape[1] == both["input_ids"].shape[1] - (6 - img.kept)
