"""Token layouts of the LLM sequence and the pure functions that cut them (no hooks, no state).

A layout describes one *segment*: the LLM input (segment 0) or the sequence from an LLM cut on. Rows are
right-aligned (left padding), so each sample's last prompt token stays in the last column. A cut layout is as wide
as its longest remaining sample: padding is rebuilt per cut, never carried over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import compact_


@dataclass
class Layout:
    """src: [B, T] slot in the previous layout (-1 = padding); valid: [B, T] bool; orig: [B, T] position in the
    original input (-1 = padding); images / image_index: per image [n] current slots and the original indices
    (0..N-1) of those tokens; position_shift: [B] subtracted from original-layout decode positions.
    position_ids / position_embeddings / mask: what every layer of the segment gets (prefill)."""

    src: torch.Tensor
    valid: torch.Tensor
    orig: torch.Tensor
    images: list[torch.Tensor]
    image_index: list[torch.Tensor]
    position_shift: torch.Tensor
    position_ids: torch.Tensor | None = None
    position_embeddings: tuple | None = None
    mask: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return int(self.valid.shape[1])


def original_layout(spans, batch: int, length: int, attention_mask, device) -> Layout:
    pos = torch.arange(length, device=device).expand(batch, length)
    valid = torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    return Layout(
        src=pos, valid=valid, orig=torch.where(valid, pos, torch.full_like(pos, -1)),
        images=[torch.arange(s.start, s.start + s.length, device=device) for s in spans],
        image_index=[torch.arange(s.length, device=device) for s in spans],
        position_shift=torch.zeros(batch, dtype=torch.long, device=device),
    )


def cut_layout(prev: Layout, spans, keeps: list[torch.Tensor]) -> tuple[Layout, torch.Tensor, torch.Tensor]:
    """The layout after dropping every image's visual slots not in ``keeps`` (per image: sorted indices into its
    current tokens), and the kernel inputs: keep_index [B, T'] (slots of prev, first counts[b] valid), counts [B].
    Padding slots are dropped too, so T' = max(counts), the longest remaining sample: one text-only or lightly
    pruned sample must not keep every other row as wide as before the cut."""
    device = prev.valid.device
    B, T = prev.valid.shape
    keep = prev.valid.clone()
    for span, kept in zip(spans, keeps):
        slots = prev.images[span.image]
        dropped = torch.ones(slots.numel(), dtype=torch.bool, device=device)
        dropped[kept.to(device)] = False
        keep[span.sample, slots[dropped]] = False
    counts = keep.sum(1)
    T_new = int(counts.max())
    keep_index = torch.full((B, T_new), -1, dtype=torch.long, device=device)
    src = torch.full((B, T_new), -1, dtype=torch.long, device=device)
    slot_of = torch.full((B, T), -1, dtype=torch.long, device=device)  # prev slot -> new slot
    for b in range(B):
        idx, c = torch.nonzero(keep[b]).flatten(), int(counts[b])
        keep_index[b, :c] = idx
        src[b, T_new - c:] = idx
        slot_of[b, idx] = torch.arange(T_new - c, T_new, device=device)
    gathered = src.clamp(min=0)
    valid = prev.valid.gather(1, gathered) & (src >= 0)
    orig = torch.where(valid, prev.orig.gather(1, gathered), torch.full_like(src, -1))
    images = [slot_of[s.sample, prev.images[s.image][k.to(device)]] for s, k in zip(spans, keeps)]
    image_index = [prev.image_index[s.image][k.to(device)] for s, k in zip(spans, keeps)]
    layout = Layout(src=src, valid=valid, orig=orig, images=images, image_index=image_index,
                    position_shift=prev.position_shift.clone())
    return layout, keep_index, counts


def evict_index(layout: Layout, final: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel inputs that lay rows in ``layout``'s slots out as ``final`` (a later layout of the same prompt):
    keep_index [B, final.length] (slots of ``layout`` holding ``final``'s valid tokens, first counts[b] valid),
    counts [B]. With ``pad_left=True`` the kept rows land on ``final``'s valid slots (both are right-aligned);
    tokens are matched by original position, so several cuts in between need no chain of ``src`` maps."""
    B, device = layout.valid.shape[0], layout.valid.device
    present = torch.zeros(B, int(layout.orig.max()) + 1, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)[:, None].expand_as(final.orig)
    present[rows[final.valid], final.orig[final.valid]] = True
    keep = layout.valid & present.gather(1, layout.orig.clamp(min=0))
    counts = keep.sum(1)
    if not torch.equal(counts, final.valid.sum(1)):
        raise ValueError("a later layout holds tokens the earlier one does not: it is not a cut of it")
    keep_index = torch.full((B, final.length), -1, dtype=torch.long, device=device)
    for b in range(B):
        idx = torch.nonzero(keep[b]).flatten()
        keep_index[b, :idx.numel()] = idx
    return keep_index, counts


def gather_rows(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Out-of-place x[b, src[b, t]] for small per-token tensors ([B|1, T] or [B|1, T, d]); -1 reads slot 0."""
    if x.shape[0] != src.shape[0]:
        x = x.expand(src.shape[0], *x.shape[1:])
    idx = src.clamp(min=0)
    return x.gather(1, idx if x.dim() == 2 else idx[..., None].expand(-1, -1, x.shape[-1]))


def cut_positions(prev: Layout, new: Layout, mode: str, visual: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids of ``new``'s slots, from ``prev.position_ids``: gathered (``original``) or contiguous over the
    valid slots from where the sample's first real token started (``renumber``). Also sets ``new.position_shift``.
    Multimodal-rope ids ([3|4, B, T], Qwen-VL) are gathered row by row; see :func:`_renumber_mrope` (``visual``:
    [B, T] slots of ``new`` holding image tokens)."""
    if prev.position_ids.dim() == 3:
        pos = torch.stack([gather_rows(row, new.src) for row in prev.position_ids])
        pos = torch.where(new.valid, pos, torch.zeros_like(pos))
        if mode == "original":
            return pos
        new_pos = _renumber_mrope(pos, new, visual if visual is not None else torch.zeros_like(new.valid))
        new.position_shift = prev.position_shift + (pos[-3, :, -1] - new_pos[-3, :, -1])
        return new_pos
    pos = gather_rows(prev.position_ids, new.src)
    if mode == "original":
        new_pos = torch.where(new.valid, pos, torch.zeros_like(pos))
    else:
        big = 1 << 30
        start = torch.where(new.valid, pos, torch.full_like(pos, big)).min(1, keepdim=True).values
        start = torch.where(start == big, torch.zeros_like(start), start)
        ranks = new.valid.long().cumsum(1) - 1
        new_pos = torch.where(new.valid, start + ranks, torch.zeros_like(ranks))
    if mode == "renumber":  # decode steps continue after the kept tokens (original: after the unpruned length)
        new.position_shift = prev.position_shift + (prev.position_ids.expand_as(prev.valid)[:, -1] - new_pos[:, -1])
    return new_pos


def _renumber_mrope(pos: torch.Tensor, new: Layout, visual: torch.Tensor) -> torch.Tensor:
    """``renumber`` for [3|4, B, T] M-RoPE ids (spec qwen_vl.md §2.7 "R1"): kept visual tokens keep their (t, h, w)
    offsets from their image's start, each text token restarts at the largest position before it + 1 (so the text
    after an image moves only when the image's last row / column was cut); the text row of generate()'s 4-row ids
    moves with the others (one shift per token, so decode steps subtract one ``position_shift``)."""
    t, h, w = pos[-3], pos[-2], pos[-1]
    text = new.valid & ~visual & (t == h) & (h == w)  # video tokens (t, h, w differ) move like visual ones
    shift = torch.zeros_like(t)
    for b in range(t.shape[0]):
        slots = torch.nonzero(new.valid[b]).flatten()
        if slots.numel() == 0:
            continue
        ts, is_text = t[b, slots], text[b, slots]
        starts = torch.ones_like(is_text)
        starts[1:] = (is_text[1:] != is_text[:-1]) | (is_text[1:] & (ts[1:] != ts[:-1] + 1))
        bounds = torch.nonzero(starts).flatten().tolist() + [slots.numel()]
        top, sh = int(ts[0]) - 1, 0
        for a, e in zip(bounds[:-1], bounds[1:]):
            if bool(is_text[a]):
                sh = int(ts[a]) - (top + 1)
                top = int(ts[e - 1]) - sh
            else:
                top = max(top, int(pos[-3:, b, slots[a:e]].max()) - sh)
            shift[b, slots[a:e]] = sh
    return torch.where(new.valid, pos - shift, torch.zeros_like(pos))


def mask_4d(valid: torch.Tensor, q_len: int, dtype, boolean: bool) -> torch.Tensor:
    """[B, 1, q, T] mask for a compacted layout: slot-causal, padding keys masked, each query sees itself."""
    B, T = valid.shape
    q_slots = torch.arange(T - q_len, T, device=valid.device)
    k_slots = torch.arange(T, device=valid.device)
    allowed = (k_slots[None, :] <= q_slots[:, None])[None] & valid[:, None, :]
    allowed = (allowed | (k_slots[None, None, :] == q_slots[None, :, None]))[:, None]
    if boolean:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(~allowed, torch.finfo(dtype).min)


def compact_tokens(x: torch.Tensor, keep_index: torch.Tensor, counts: torch.Tensor, in_place: bool) -> torch.Tensor:
    """[B, T, D] -> [B, T', D] keeping rows ``keep_index`` right-aligned: in place with the kernel, or out of place
    (autograd, or a tensor the caller was handed back, e.g. ``output_hidden_states``)."""
    if in_place:
        return compact_(x, keep_index, dim=1, counts=counts, pad_left=True)
    out = gather_rows(x, keep_index)
    res = torch.zeros_like(out)
    T_new = keep_index.shape[1]
    for b in range(x.shape[0]):
        c = int(counts[b])
        res[b, T_new - c:] = out[b, :c]
    return res


def visual_key_mask(layout: Layout, spans, key_length: int) -> torch.Tensor:
    """[B, key_length] bool, True where a key slot holds a visual token of ``layout`` (keys past the layout are
    generated tokens: text)."""
    B = layout.valid.shape[0]
    mask = torch.zeros(B, key_length, dtype=torch.bool, device=layout.valid.device)
    for span, slots in zip(spans, layout.images):
        mask[span.sample, slots[slots < key_length]] = True
    return mask


def slots_of(layout: Layout, image: int, index: torch.Tensor) -> torch.Tensor:
    """[n] slots in ``layout`` of the image's tokens with original indices ``index`` (all present there)."""
    known = layout.image_index[image]
    return layout.images[image][torch.searchsorted(known, index.to(known.device))]


def instruction_slots(layout: Layout, spans, sample: int) -> torch.Tensor:
    """Slots of the sample's prompt tokens after its last image (the instruction), in ``layout``."""
    last = max((int(layout.images[s.image].max()) for s in spans if s.sample == sample and layout.images[s.image].numel()),
               default=-1)
    return torch.arange(last + 1, layout.length, device=layout.valid.device)
