"""Cut point ("pre_llm") at the language model's entry: the cut implied by vision-stage cuts, then every
pre-LLM step in pipeline order, on the merged ``inputs_embeds``, the 2-D mask and the position ids."""

from __future__ import annotations

import dataclasses

import torch

from ..core.layout import original_layout
from ..core.spans import check_left_padded
from ..errors import PruneError
from ..methods.base import Cut
from . import vision
from .cut import cut_tokens


def prepare(host, fwd, kwargs: dict) -> dict:
    """Set ``fwd.segments[0]`` (the layout entering the LLM) and return the language model's kwargs for it."""
    embeds = kwargs.get("inputs_embeds")
    if embeds is None or embeds.shape[1] != fwd.length:
        raise PruneError("vtprune: the language model did not receive the merged inputs_embeds it expected")
    attention_mask = kwargs.get("attention_mask")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() != 2:
        raise PruneError("vtprune: only 2-D attention masks are supported with pruning")
    check_left_padded(attention_mask)
    lm_config = host.adapter.language_model.config
    fwd.keep_hidden_states = bool(kwargs.get("output_hidden_states", getattr(lm_config, "output_hidden_states", False)))
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(fwd.length, device=embeds.device)[None]  # the LLM's own default
    if position_ids.dim() not in (2, 3):
        raise PruneError(f"vtprune: position ids of shape {tuple(position_ids.shape)}; expected [B, T] or "
                         "[rows, B, T] (multimodal rope)")
    fwd.deepstack = deepstack_inputs(host.adapter.take_deepstack(kwargs))
    layout = original_layout(fwd.spans, fwd.batch, fwd.length, attention_mask, embeds.device)
    layout.position_ids = position_ids
    cut = False
    for step, answer in _steps(host, fwd):
        new, embeds = cut_tokens(host, fwd, step, layout, embeds, "pre_llm", answer)
        if new is not None:
            layout, cut = new, True
    kwargs["position_ids"] = layout.position_ids
    if cut:
        kwargs["inputs_embeds"] = embeds
        # an explicit mask also stops transformers from reading position gaps as packed sequences
        kwargs["attention_mask"] = layout.valid.long()
    fwd.segments[0] = layout
    if not host.plan.llm:
        fwd.stats.finish()
    return kwargs


def deepstack_inputs(taken):
    """(visual_pos_masks [B, T] bool, rank [B, T]: row of each masked slot in the features, per-layer features)
    from the language model's DeepStack kwargs, which vtprune takes over (``add_deepstack``); None without."""
    if taken is None:
        return None
    mask, embeds = taken
    mask = mask.bool()
    rank = mask.flatten().long().cumsum(0).view_as(mask) - 1  # row-major over [B, T], as the model indexes them
    return mask, rank, embeds


def add_deepstack(fwd, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """After decoder layer ``layer``: add its DeepStack feature to every visual token still present, each its own
    row (the model's ``hidden[visual_pos_masks] += embeds[layer]``, on the layer's current layout)."""
    mask, rank, embeds = fwd.deepstack
    if layer >= len(embeds):  # a tower built shallower than its DeepStack indexes gives fewer features
        return hidden
    layout = fwd.layout_at(layer)
    orig = layout.orig.clamp(min=0).to(mask.device)
    here = layout.valid.to(mask.device) & mask.gather(1, orig)
    rows = rank.gather(1, orig)[here]
    out = hidden.clone()
    out[here] = hidden[here] + embeds[layer][rows].to(hidden.device, hidden.dtype)
    return out


def _steps(host, fwd):
    """(step, precomputed answer or None) in order: the vision cuts' survivors first, then the pre-LLM steps."""
    first = host.plan.vision_step
    if first is not None:
        yield dataclasses.replace(first, cut=Cut("pre_llm")), vision.survivors(host, fwd)
    for step in host.plan.pre_llm:
        yield step, None
