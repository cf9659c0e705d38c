"""Cut points ("llm", k) before decoder layers. A cut starts a new *segment*: the kept hidden states, their
position ids and rotary cos/sin, and a 4-D mask for the shorter sequence; every later layer of the segment gets
the same (the language model hands each layer the full-length ones)."""

from __future__ import annotations

import torch

from .. import compat
from ..core.layout import Layout, gather_rows, mask_4d
from .cut import cut_tokens


def before_layer(host, fwd, layer: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Run the plan's steps before ``layer`` and point ``kwargs`` at the layer's segment; returns the hidden states."""
    for step in host.plan.llm.get(layer, ()):
        prev = fwd.layout_at(layer)
        new, hidden = cut_tokens(host, fwd, step, prev, hidden, "llm")
        if new is not None:
            _segment_inputs(host, step.method.positions_at(step.cut), prev, new, hidden, kwargs)
            fwd.segments[layer] = new
    if layer == max(host.plan.llm):
        fwd.stats.finish()
    start = max(k for k in fwd.segments if k <= layer)
    if start > 0:
        seg = fwd.segments[start]
        kwargs["position_embeddings"], kwargs["position_ids"], kwargs["attention_mask"] = (
            seg.position_embeddings, seg.position_ids, seg.mask)
    return hidden


def _segment_inputs(host, positions: str, prev: Layout, new: Layout, hidden: torch.Tensor, kwargs: dict) -> None:
    cos, sin = kwargs["position_embeddings"] if prev.position_embeddings is None else prev.position_embeddings
    if positions == "original":
        new.position_embeddings = (gather_rows(cos, new.src), gather_rows(sin, new.src))
    else:
        new.position_embeddings = host.adapter.rotary(hidden, new.position_ids)
    incoming = kwargs.get("attention_mask") if prev.mask is None else prev.mask
    if incoming is None and bool(new.valid.all()):
        new.mask = None
    else:
        impl = compat.get_attn_implementation(host.adapter.language_model.config)
        new.mask = mask_4d(new.valid, new.length, hidden.dtype, compat.mask_is_boolean(impl))
