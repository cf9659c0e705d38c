"""ReceivedAttention (Qwen-VL's substitute for CLS attention, spec qwen_vl.md §1.3) against an eager attention map
built in the test from the vision block's own weights, including Qwen2.5-VL's window permutation."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vtprune
from vtprune.core.probes import ReceivedAttention
from vtprune.errors import ConfigError, PruneError
from vtprune.methods.base import Method, Selection

from ..conftest import collate
from ..qwen_fixtures import make_qwen_prompt

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class _Grab(Method):
    """Test-only: keeps everything and hands the probe's per-image scores to ``seen``."""

    block: int | None = None
    seen: list | None = None
    name: ClassVar[str] = "_test_grab_received"
    has_budget: ClassVar[bool] = False

    def probes(self, model):
        return (ReceivedAttention(self.block),)

    def select(self, image, n_keep):
        self.seen.append(image[ReceivedAttention(self.block)]["scores"].clone())
        return Selection(keep=torch.arange(image.n))


def _eager_received(model, block: int, captured: dict, grid: torch.Tensor) -> torch.Tensor:
    """[U] per merged token (images in order): column sums of each segment's full softmax map, head mean, mean of
    the 4 patches of each unit, placed at the token the window permutation took it from."""
    attn = model.model.visual.blocks[block].attn
    x, kw = captured["x"], captured["kwargs"]
    q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(q, k, *kw["position_embeddings"])
    cu = kw["cu_seqlens"].tolist()
    cols = []
    for a, e in zip(cu[:-1], cu[1:]):
        probs = ((q[a:e].transpose(0, 1).float() @ k[a:e].transpose(0, 1).float().transpose(-1, -2))
                 * attn.scaling).softmax(-1)  # [H, n, n], the whole map
        cols.append(probs.sum(1).mean(0))
    units = torch.cat(cols).view(-1, 4).mean(1)
    vc = model.config.vision_config
    if hasattr(vc, "window_size"):
        from transformers.vision_utils import get_vision_window_index

        window_index = get_vision_window_index(grid, 2, vc.window_size, vc.patch_size)[0]
        assert not torch.equal(window_index, torch.arange(units.numel()))  # the permutation is really exercised
    else:
        window_index = torch.arange(units.numel())
    tokens = torch.empty_like(units)
    tokens[window_index] = units  # block position i holds merged token window_index[i]
    return tokens


@pytest.mark.parametrize("family,block", [("qwen2_5_vl", None), ("qwen2_5_vl", 1), ("qwen3_vl", None), ("qwen3_vl", 2)])
def test_received_attention_equals_eager_column_mass(models, family, block):
    model = models(family)
    prompt = make_qwen_prompt(model, 3, seed=0, grids=[(8, 6), (4, 8)])
    full = (model.config.vision_config.fullatt_block_indexes[-1] if family == "qwen2_5_vl"
            else model.config.vision_config.depth - 1)
    used = full if block is None else block
    captured, seen = {}, []
    handle = model.model.visual.blocks[used].attn.register_forward_pre_hook(
        lambda m, args, kwargs: captured.update(x=args[0], kwargs=kwargs), with_kwargs=True)
    try:
        with vtprune.pruned(model, [_Grab(block=block, seen=seen)]), torch.no_grad():
            model(**collate([prompt]))
    finally:
        handle.remove()
    with torch.no_grad():
        expected = _eager_received(model, used, captured, prompt.extra["image_grid_thw"])
    torch.testing.assert_close(torch.cat(seen), expected, atol=1e-6, rtol=1e-5)
    assert [s.numel() for s in seen] == [12, 8]


def test_a_windowed_block_or_a_cls_tower_is_refused(models):
    with pytest.raises(PruneError, match="vision block 0 of qwen2_5_vl attends within windows.*full-attention block"):
        vtprune.prune(models("qwen2_5_vl"), [_Grab(block=0, seen=[])])
    with pytest.raises(ConfigError, match="without a CLS token.*use VisionCLS"):
        vtprune.prune(models("llava"), [_Grab(seen=[])])
    with pytest.raises(ConfigError, match="vision_block is for towers without CLS"):
        vtprune.prune(models("llava"), "vtc_cls", ratio=0.5, vision_block=3)
