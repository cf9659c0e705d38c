"""Cut points ("llm", k) before decoder layers. A cut starts a new *segment*: the kept hidden states, their
position ids and rotary cos/sin, and a 4-D mask for the shorter sequence; every later layer of the segment gets
the same (the language model hands each layer the full-length ones). With ``evict_early_kv``, the end of the
prefill cuts the cache of every layer before the last segment to that segment's tokens."""

from __future__ import annotations

import itertools

import torch

from .. import compat
from ..core.layout import Layout, evict_index, gather_rows, mask_4d
from ..errors import PruneError
from ..kernels import compact_
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
            seg.position_embeddings, host.adapter.layer_position_ids(seg.position_ids), seg.mask)
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


def evict_early_kv(fwd, cache) -> dict[int, Layout] | None:
    """After the prefill: cut every layer's cache before the last segment to the last segment's tokens (text and
    the final kept visual tokens, laid out in its slots; keys keep the rope positions they were computed at).
    Returns the segments decode steps use ({0: last}), or None when no LLM cut removed anything."""
    starts = sorted(fwd.segments)
    if len(starts) == 1:
        return None
    final = fwd.segments[starts[-1]]
    for start, end in itertools.pairwise(starts):
        keep_index, counts = evict_index(fwd.segments[start], final)
        for layer in range(start, end):
            keys, values = compat.cache_layer_kv(cache, layer)
            if keys.shape[2] != fwd.segments[start].length:
                raise PruneError(f"vtprune: evict_early_kv: layer {layer} caches {keys.shape[2]} tokens, its segment "
                                 f"has {fwd.segments[start].length}; the cache was not filled by this prefill alone")
            compat.set_cache_layer_kv(cache, layer, _evicted(keys, keep_index, counts),
                                      _evicted(values, keep_index, counts))
    fwd.stats.evicted_early_kv = True
    return {0: final}


def _evicted(x: torch.Tensor, keep_index: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[B, H, T, d] -> [B, H, T', d] kept rows right-aligned: in place, or on a copy when autograd tracks x."""
    if x.requires_grad:  # the Triton kernel is invisible to autograd; the torch path's copy_ is recorded
        return compact_(x.clone(), keep_index, dim=2, counts=counts, pad_left=True, backend="torch")
    return compact_(x, keep_index, dim=2, counts=counts, pad_left=True)
