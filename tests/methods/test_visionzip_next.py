"""VisionZip on LLaVA-NeXT as the official code (``llava_arch.py`` + ``clip_encoder.py``, spec §4): per crop
CLS + top-(D-1) patches by the feature layer's CLS attention + C contextual merges on projector inputs, then
the projector; order [base crop: CLS, dominant, contextual] + grid dominants in whole-grid raster + grid CLS
+ grid contextual. Recomputed here from the model's own pieces (eager ``output_attentions``, k_proj of the
layer-normed input, the projector), never from vtprune's code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

import vtprune
from vtprune.methods.base import Cut, ImageView, VisionView
from vtprune.registry import make_method

from ..conftest import build_model, collate, make_prompt

CONFIG = Path(vtprune.__file__).parent / "configs" / "visionzip" / "llava-next-7b.yaml"


def _crop_tokens(attn, hs, keys, n_dom, n_ctx):
    """One crop, spec §4.2: (cls [1, D_in], dominant [D-1] sorted, dominant rows, contextual rows, targets)."""
    dominant = sorted(torch.topk(attn[:, 0, 1:].sum(0), n_dom - 1).indices.tolist())
    rest = [i for i in range(hs.shape[0] - 1) if i not in dominant]
    step = max(1, len(rest) // n_ctx)
    targets = rest[::step][:n_ctx]
    members = [i for i in rest if i not in targets]
    kn = F.normalize(keys[1:], dim=-1)
    assign = (kn[members] @ kn[targets].T).argmax(-1).tolist()
    ctx = []
    for c, t in enumerate(targets):
        group = [m for m, a in zip(members, assign) if a == c]
        ctx.append(hs[1 + t] + (hs[1:][group].mean(0) if group else 0))
    return hs[:1], dominant, hs[1:][dominant], torch.stack(ctx), targets


def _reference(model, eager, prompt, n_dom, n_ctx):
    """[crops x (D + C), D_llm] embeddings the official code feeds the LLM for this prompt's image."""
    cfg, size = model.config, prompt.image_sizes[0]
    crop_px = cfg.vision_config.image_size
    n_crops = image_size_to_num_patches(size, cfg.image_grid_pinpoints, crop_px)
    pv = prompt.pixel_values[0, :n_crops]
    tower, layer = model.model.vision_tower, len(model.model.vision_tower.encoder.layers) - 2
    with torch.no_grad():
        attn = eager.model.vision_tower(pv, output_attentions=True).attentions[layer]  # [C, H, S, S]
        hidden = tower(pv, output_hidden_states=True).hidden_states
        block = tower.encoder.layers[layer]
        k = block.self_attn.k_proj(block.layer_norm1(hidden[layer]))
        keys = k.view(n_crops, k.shape[1], block.self_attn.num_heads, -1).mean(2)  # head-averaged
    hs = hidden[layer + 1]  # the feature layer's output = projector input, CLS row included
    crops = [_crop_tokens(attn[c], hs[c], keys[c], n_dom, n_ctx) for c in range(n_crops)]
    rows, cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, crop_px)
    side = int(round((hs.shape[1] - 1) ** 0.5))
    grid = []  # (raster position in the whole grid, feature) of every grid crop's dominant patch
    for c, (_, dominant, dom_rows, _, _) in enumerate(crops[1:]):
        i, j = divmod(c, cols)
        for p, row in zip(dominant, dom_rows):
            y, x = divmod(p, side)
            grid.append(((i * side + y) * cols * side + j * side + x, row))
    grid = [row for _, row in sorted(grid, key=lambda g: g[0])]
    values = [crops[0][0], crops[0][2], crops[0][3], torch.stack(grid)]
    values += [c[0] for c in crops[1:]] + [c[3] for c in crops[1:]]
    with torch.no_grad():
        return model.model.multi_modal_projector(torch.cat(values)), n_crops, crops[0]


@pytest.mark.parametrize("budget,split", [(dict(keep=32), (27, 5)), (dict(keep=8), (7, 1)),
                                          (dict(ratio=0.5), (27, 5))])
def test_next_llm_receives_official_per_crop_tokens(models, budget, split):
    model = models("llava_next")
    eager = build_model("llava_next", attn="eager")
    eager.load_state_dict(model.state_dict())
    prompts = [make_prompt(model, "llava_next", 3 + 4 * i, i) for i in range(3)]  # 3, 5 and 5 crops
    batch = collate(prompts)
    captured = {}

    def grab(module, args, kwargs):  # registered after vtprune's hook: sees the pruned LLM input
        captured.update(embeds=kwargs["inputs_embeds"].clone(), mask=kwargs["attention_mask"].clone())

    with vtprune.pruned(model, "visionzip", **budget), torch.no_grad():
        hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(**batch)
        finally:
            hook.remove()
        stats = model.vtprune.stats
    n_dom, n_ctx = split
    for b, (p, img) in enumerate(zip(prompts, stats.images)):
        expected, n_crops, base = _reference(model, eager, p, n_dom, n_ctx)
        k = n_crops * (n_dom + n_ctx)
        assert img.kept == k == expected.shape[0]
        valid = torch.nonzero(captured["mask"][b]).flatten()
        assert valid.numel() == p.input_ids.numel() - img.n_tokens + k
        start = int(valid[0]) + int(torch.nonzero(p.input_ids == model.config.image_token_id)[0])
        torch.testing.assert_close(captured["embeds"][b, start:start + k], expected, atol=1e-5, rtol=1e-5)
        # stats: the base crop's patches are tokens 0..P-1 in HF's packing, so its kept ones are visible as is
        n_patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
        assert [i for i in img.kept_index if i < n_patches] == sorted(base[1] + base[4])
        assert img.kept_index == sorted(set(img.kept_index)) and all(0 <= i < img.n_tokens for i in img.kept_index)


def test_next_global_mode_keeps_todays_image_level_budget(models):
    model = models("llava_next")
    batch = collate([make_prompt(model, "llava_next", 4, i) for i in range(2)])
    with vtprune.pruned(model, "visionzip", keep=12, anyres="global"), torch.no_grad():
        model(**batch)
        stats = model.vtprune.stats
    for img in stats.images:
        assert img.kept == max(1, int(img.n_tokens * 12 / 64 + 0.5))


def _next_image(n_crops=5, n_tokens=2928, patches=576):
    """A 672x672 LLaVA-NeXT-7B image as a method sees it: 5 crops of 576 patches, 576 + 48 x 49 tokens."""
    view = VisionView(cls_attention=torch.zeros(n_tokens), keys=torch.zeros(n_tokens, 1), pre_projector=None,
                      cls_pre_projector=None, project=None, crop_cls=torch.zeros(n_crops, patches))
    return ImageView(sample=0, image=0, index_in_sample=0, n_tokens=n_tokens, index=torch.arange(n_tokens),
                     embeds=torch.zeros(n_tokens, 1), cut=Cut("pre_llm"), nominal=patches, n_received=n_tokens,
                     _lookup=lambda probe: view)


@pytest.mark.parametrize("keep,total,split", [(32, 160, (27, 5)), (64, 320, (54, 10)), (128, 640, (108, 20))])
def test_table9_budgets_are_per_crop(keep, total, split):
    method = make_method("visionzip", keep=keep)
    assert method.budget(_next_image()) == total
    assert method.split(keep) == split


def test_shipped_next_config_is_table9_160():
    data = yaml.safe_load(CONFIG.read_text())
    data.pop("model")
    method = make_method(data.pop("method"), **data)
    assert method.anyres == "per_crop"
    assert method.budget(_next_image()) == 160
    assert method.split(160 // 5) == (27, 5)
