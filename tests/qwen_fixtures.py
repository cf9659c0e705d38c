"""Tiny random Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE models and prompts (spec qwen_vl.md §5), built from configs."""

from __future__ import annotations

import torch

QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 100, 103, 101, 102
# patch grids (h, w) of the prompts' images: 4 to 12 tokens each, several aspect ratios
GRIDS = [(4, 6), (8, 4), (4, 4), (6, 8), (8, 6)]


def qwen_config(family: str, window_size: int = 56):
    """window_size 56 on Qwen2.5-VL: 2x2-token windows, so the window permutation is not the identity."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig, Qwen3VLMoeConfig

    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                initializer_range=0.2)
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.2)
    ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)
    if family == "qwen2_5_vl":
        text["rope_parameters"] = dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3])
        vision.update(patch_size=14, window_size=window_size, fullatt_block_indexes=[1, 3], tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    text.update(head_dim=16, rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[4, 2, 2]))
    vision.update(patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2])
    if family == "qwen3_vl":
        return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, **ids)


def model_class(family: str):
    from transformers import (
        Qwen2_5_VLForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeForConditionalGeneration,
    )

    return {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen3_vl": Qwen3VLForConditionalGeneration,
            "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration}[family]


def row_width(model) -> int:
    vc = model.config.vision_config
    return 3 * vc.temporal_patch_size * vc.patch_size ** 2


def make_qwen_prompt(model, text_len: int, seed: int, n_images: int = 1, grids=None):
    """One sample: text, then per image <vision_start> h*w/4 image tokens <vision_end> and 3 text tokens."""
    from .conftest import Prompt

    g = torch.Generator().manual_seed(seed)
    grids = grids or [GRIDS[(seed + i) % len(GRIDS)] for i in range(n_images)]
    ids = [1] + torch.randint(3, 99, (text_len,), generator=g).tolist()
    for h, w in grids:
        ids += [VISION_START] + [IMAGE_TOKEN] * (h * w // 4) + [VISION_END] + torch.randint(3, 99, (3,), generator=g).tolist()
    rows = sum(h * w for h, w in grids)
    pv = torch.randn(rows, row_width(model), generator=g)
    grid = torch.tensor([[1, h, w] for h, w in grids], dtype=torch.long).reshape(-1, 3)
    return Prompt(torch.tensor(ids), pv, None, extra={"image_grid_thw": grid})


def qwen_batch(batch: dict, prompts) -> dict:
    """collate()'s batch with the Qwen inputs: image_grid_thw and mm_token_type_ids (1 on image tokens)."""
    grids = [p.extra["image_grid_thw"] for p in prompts]
    batch["image_grid_thw"] = torch.cat(grids)
    batch["mm_token_type_ids"] = (batch["input_ids"] == IMAGE_TOKEN).long()
    if batch["image_grid_thw"].shape[0] == 0:
        del batch["pixel_values"], batch["image_grid_thw"]
    return batch
