"""Decode steps of ``generate()`` on the compacted cache: generate() keeps an original-layout 2-D mask and
original positions; the language-model entry maps them onto the entry segment, and layers of later segments
get a 4-D mask for their shorter cache (and, for renumbered cuts, their own positions). After ``evict_early_kv``
the generation has one segment (the prefill's last): every layer gets the entry's mask and positions."""

from __future__ import annotations

import torch

from .. import compat
from ..core.context import Generation
from ..core.layout import Layout, mask_4d
from ..errors import PruneError


def llm_inputs(gen: Generation, kwargs: dict):
    """Translate generate()'s original-layout 2-D mask / positions onto the compacted cache."""
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        return None
    q, entry = embeds.shape[1], gen.entry
    cached = compat.cache_length(gen.cache, 0)
    new_tokens = cached - entry.length + q  # tokens after the prompt, this step's included
    am = kwargs.get("attention_mask")
    if isinstance(am, torch.Tensor):
        if am.dim() != 2:
            raise PruneError("vtprune: only 2-D attention masks are supported with pruning")
        if am.shape[1] == gen.prompt_length + new_tokens:
            tail = am[:, gen.prompt_length:]
        elif am.shape[1] == cached + q:
            tail = am[:, entry.length:]  # already in the compacted layout
        else:
            raise PruneError(
                f"vtprune: decode attention_mask has {am.shape[1]} columns; expected "
                f"{gen.prompt_length + new_tokens} (original layout) or {cached + q} (compacted cache)"
            )
        kwargs["attention_mask"] = torch.cat([entry.valid.to(tail.dtype), tail], dim=1)
    elif not bool(entry.valid.all()):
        ones = torch.ones(entry.valid.shape[0], new_tokens, dtype=torch.long, device=entry.valid.device)
        kwargs["attention_mask"] = torch.cat([entry.valid.long(), ones], 1)
    pos = kwargs.get("position_ids")
    if pos is None:
        last = entry.position_ids[..., -1:]  # [B, 1] or [rows, B, 1] (multimodal rope)
        kwargs["position_ids"] = last + 1 + (new_tokens - q) + torch.arange(q, device=last.device)
    else:
        kwargs["position_ids"] = pos - entry.position_shift[:, None].to(pos.device)
    gen.step_mask, gen.step_positions = kwargs.get("attention_mask"), kwargs["position_ids"]
    return (), kwargs


def layer_inputs(host, gen: Generation, layer: int, hidden: torch.Tensor, kwargs: dict) -> None:
    """Mask (and renumbered positions) of a decode step for a layer past an LLM cut."""
    start = max(k for k in gen.segments if k <= layer)
    if start == 0:
        return
    seg: Layout = gen.segments[start]
    q = hidden.shape[1]
    new_tokens = compat.cache_length(gen.cache, layer) - seg.length + q
    am2d = gen.step_mask
    if isinstance(am2d, torch.Tensor):
        tail = am2d[:, am2d.shape[1] - new_tokens:].bool()
    else:
        tail = torch.ones(seg.valid.shape[0], new_tokens, dtype=torch.bool, device=seg.valid.device)
    valid = torch.cat([seg.valid, tail], dim=1)
    if kwargs.get("attention_mask") is None and bool(valid.all()):
        kwargs["attention_mask"] = None
    else:
        impl = compat.get_attn_implementation(host.adapter.language_model.config)
        kwargs["attention_mask"] = mask_4d(valid, q, hidden.dtype, compat.mask_is_boolean(impl))
    extra = seg.position_shift - gen.entry.position_shift
    if bool((extra != 0).any()):
        # the language-model entry already moved decode positions into the entry layout; only the shift the LLM
        # cuts up to this segment added is left (subtracting seg's total shift would count the entry's twice)
        pos = gen.step_positions - extra[:, None]  # model-level ids: a layer may get only the text row (Qwen-VL)
        kwargs["position_ids"] = host.adapter.layer_position_ids(pos)
        kwargs["position_embeddings"] = host.adapter.rotary(hidden, pos)
