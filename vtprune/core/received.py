"""``ReceivedAttention``: the attention each image token receives in one full-attention vision block, the score that
replaces CLS attention on towers without a CLS token (Qwen-VL; spec qwen_vl.md §1.3, as the VisionZip / VisPruner
ports, VScan and HiPrune compute it). Re-exported by :mod:`.probes`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import PruneError
from .probe_base import ImageSlice, Probe, _check_vision, _scaling

QUERY_CHUNK = 1024  # queries per softmax block: the [H, chunk, n] slab is all that is ever materialised


def column_mass(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """[n] attention received by each key, summed over all queries, mean over heads; q, k [1, H, n, d]. The
    softmax rows are built QUERY_CHUNK queries at a time, never the full [H, n, n] map."""
    k = key[0].float().transpose(-1, -2)
    cols = torch.zeros(key.shape[1], key.shape[2], dtype=torch.float32, device=key.device)
    for s in range(0, query.shape[2], QUERY_CHUNK):
        cols += ((query[0, :, s:s + QUERY_CHUNK].float() @ k) * scaling).softmax(-1).sum(1)
    return cols.mean(0)


@dataclass(frozen=True)
class ReceivedAttention(Probe):
    """Per image token: ``scores`` [n], the column mass of its 2x2 patches in vision block ``block`` (the queries
    of its own image frame, head mean, averaged over the patches, mapped back through the window permutation), and
    ``keys`` [n, d], the head-mean keys averaged the same way (for merging). ``block`` None: the last
    full-attention block. Computed in the attention chain per segment (SDPA stays on), or split by ``cu_seq_lens``
    under flash attention."""

    block: int | None = None
    scope: ClassVar[str] = "vision"
    needs_crops: ClassVar[bool] = False  # reads the packed tower: offered where vision cuts are not

    def check(self, info):
        if info.vision_cuts:
            raise PruneError(f"vtprune: {self} is for vision towers without a CLS token (Qwen-VL); this model has "
                             "one: use VisionCLS")
        if self.block is not None:
            _check_vision(self, (self.block,), info)

    def attach(self, host):
        a = host.adapter
        block = a.full_attention_block(self.block)

        def started(module, args):  # one record per image encoding: a later video run of the tower is not it
            run = host.vision_run()
            if run is not None:
                run.records.setdefault(self, {"scores": [], "keys": [], "runs": 0})["runs"] += 1

        def record(next, module, query, key, value, attention_mask, **kwargs):
            run = host.vision_run()
            rec = run.records.get(self) if run is not None else None
            if rec is not None and rec["runs"] == 1:
                for q, k in _segments(query, key, kwargs):
                    rec["scores"].append(column_mass(q, k, _scaling(q, kwargs)))
                    rec["keys"].append(k[0].float().mean(0))
            return next(module, query, key, value, attention_mask, **kwargs)

        host.hooks.pre(a.vision_layers[block], started, with_kwargs=False)
        host.hooks.attention(a.vision_attention(a.vision_layers[block]), record, "record")

    def for_image(self, record, where: ImageSlice):
        scores, keys = torch.cat(record["scores"]), torch.cat(record["keys"])
        per_token, order = where.adapter.vision_token_order(where.forward.image_sizes)
        if scores.shape[0] != order.numel() * per_token:
            raise PruneError(f"vtprune: {self} saw {scores.shape[0]} patches in the vision block, the images need "
                             f"{order.numel() * per_token}")
        scores = scores.view(-1, per_token).mean(1)[order]
        keys = keys.view(-1, per_token, keys.shape[-1]).mean(1)[order]
        first = where.adapter.vision_token_offset(where.forward.source(where.span), where.forward.image_sizes)
        tokens = first + where.index.to(scores.device)
        return {"scores": scores[tokens], "keys": keys[tokens]}


def _segments(query, key, kwargs):
    """(q, k) per attention segment: the call's own tensors, or split by ``cu_seq_lens_q`` (one varlen call)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return [(query, key)]
    lengths = (cu[1:] - cu[:-1]).tolist()
    return list(zip(torch.split(query, lengths, dim=2), torch.split(key, lengths, dim=2)))
