"""Qwen-VL architectures for :mod:`vtprune.perf.archs`: the published dimensions of Qwen2.5-VL-7B-Instruct and
Qwen3-VL-8B-Instruct (their ``config.json``), the configs at reduced depth, and prompts of the right shape
(patch rows + ``image_grid_thw``, ``<|vision_start|>`` / ``<|vision_end|>`` around the image run)."""

from __future__ import annotations

import torch

# Qwen2.5-VL-7B-Instruct: 32 vision blocks of 1280 (SwiGLU 3420, 16 heads), 112-px windows, full attention in
# blocks 7/15/23/31, 2x2 merger to 3584; Qwen2-7B-like LLM (28 x 3584, 28 heads / 4 KV, FFN 18944, vocab 152064)
QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                     window_size=112, fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=3584,
                     spatial_merge_size=2, temporal_patch_size=2, hidden_act="silu", tokens_per_second=2)
QWEN25_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                   num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                   bos_token_id=151643, eos_token_id=151645)
# Qwen3-VL-8B-Instruct: 27 vision blocks of 1152 (GELU 4304, 16 heads), patch 16, DeepStack from blocks 8/16/24,
# merger to 4096; Qwen3-8B-like LLM (36 x 4096, 32 heads / 8 KV, head_dim 128, FFN 12288, vocab 151936)
QWEN3_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                    out_hidden_size=4096, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")
QWEN3_TEXT = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                  rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20]})
QWEN_TOP = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                vision_end_token_id=151653, tie_word_embeddings=False)
# default image: 48 x 48 patches = 576 merged tokens (as many as LLaVA-1.5), 672 px (2.5) / 768 px (3)
DEFAULT_GRID = (48, 48)


def qwen_config(family: str, vision: dict, text: dict, top: dict, vision_layers: int, llm_layers: int):
    """The config at reduced depth: full-attention and DeepStack block indexes past the depth are dropped."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    vision = dict(vision, depth=vision_layers)
    for key in ("fullatt_block_indexes", "deepstack_visual_indexes"):
        if key in vision:
            vision[key] = [i for i in vision[key] if i < vision_layers]
    cls = Qwen2_5_VLConfig if family == "qwen2_5_vl" else Qwen3VLConfig
    return cls(vision_config=vision, text_config=dict(text, num_hidden_layers=llm_layers), **top)


def qwen_inputs(model, g: torch.Generator, text_tokens: int, batch: int, image_size) -> dict:
    """One image per sample: ``text_tokens`` random text ids (1/8 before the image) around
    <|vision_start|> h*w/4 image tokens <|vision_end|>; ``image_size`` (height, width) in pixels, rounded down to
    whole 2x2 merge units (default 48 x 48 patches)."""
    cfg, vc = model.config, model.config.vision_config
    unit = vc.patch_size * vc.spatial_merge_size
    h, w = ((image_size[0] // unit) * 2, (image_size[1] // unit) * 2) if image_size is not None else DEFAULT_GRID
    if h < 2 or w < 2:
        raise ValueError(f"image_size {image_size} is smaller than one {unit} x {unit} merge unit")
    param = next(model.parameters())
    rows = h * w * batch
    pixel_values = torch.randn(rows, 3 * vc.temporal_patch_size * vc.patch_size ** 2, generator=g)
    n_text = text_tokens - 2  # <|vision_start|> and <|vision_end|> count as text
    if n_text < 1:
        raise ValueError(f"text_tokens must be >= 3 (the vision delimiters and one text token), got {text_tokens}")
    before = n_text // 8
    image = [cfg.vision_start_token_id] + [cfg.image_token_id] * (h * w // 4) + [cfg.vision_end_token_id]
    tc = cfg.get_text_config()
    specials = (tc.bos_token_id, tc.eos_token_id, tc.pad_token_id, cfg.image_token_id, cfg.vision_start_token_id)
    top = min(int(x) for x in specials if isinstance(x, int) and x > 3)  # ordinary text: below every special id
    ids = [torch.randint(3, top, (n_text,), generator=g).tolist() for _ in range(batch)]
    input_ids = torch.tensor([t[:before] + image + t[before:] for t in ids], device=param.device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values.to(param.device, param.dtype),
            "image_grid_thw": torch.tensor([[1, h, w]] * batch, device=param.device),
            "mm_token_type_ids": (input_ids == cfg.image_token_id).long()}
