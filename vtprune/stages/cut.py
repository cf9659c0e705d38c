"""What every LLM-side cut point does: build one view per image, ask the method, check its answer, cut the
layout and the hidden states, write replacement rows, record stats. Never branches on the method."""

from __future__ import annotations

import torch

from ..core.layout import Layout, compact_tokens, cut_layout, cut_positions, visual_key_mask
from ..core.probes import CropSlice, ImageSlice
from ..core.stats import StageStats
from ..errors import PruneError
from ..methods.base import ImageView, Selection


def probe_lookup(host, step, records: dict, where, view: str):
    """``image[probe]`` (``view`` "crop" or "image") or ``image.batch(probe)`` ("batch") for one view: only
    declared probes, computed once."""
    declared, cache = host.plan.declared.get(step.slot, frozenset()), {}
    slice_of = {"crop": "for_crop", "image": "for_image", "batch": "for_batch"}[view]

    def lookup(probe):
        if probe not in declared:
            raise PruneError(f"vtprune: {step.method.name} reads {probe} but does not declare it; return it from probes()")
        if probe not in cache:
            record = records(probe)
            if record is None:
                raise PruneError(
                    f"vtprune: {probe} recorded nothing before {step.method.name}'s cut at {step.cut}; an LLM probe "
                    "must observe a layer before the cut, a vision probe needs pixel_values"
                )
            cache[probe] = getattr(probe, slice_of)(record, where)
        return cache[probe]

    return lookup


def image_views(host, step, fwd, layout: Layout, hidden: torch.Tensor) -> list[tuple[object, ImageView]]:
    """(span, view) of every image with tokens left, for an LLM-side cut."""
    def records(probe):
        store = fwd.vision.records if probe.scope == "vision" and fwd.vision is not None else fwd.records
        return store.get(probe)

    out, batch_cache = [], {}
    for span in fwd.spans:
        index = layout.image_index[span.image]
        if index.numel() == 0:
            continue  # an earlier cut removed all of this image's tokens
        key = (step.slot, span.image)
        where = ImageSlice(span, fwd, host.adapter, index)
        out.append((span, ImageView(
            sample=span.sample, image=span.image, index_in_sample=span.index_in_sample, n_tokens=span.length,
            index=index, embeds=hidden[span.sample, layout.images[span.image]], cut=step.cut,
            nominal=host.adapter.image_nominal, n_received=fwd.received.setdefault(key, int(index.numel())),
            model=host.plan.info, state=fwd.state.setdefault(key, {}), shared=fwd.shared.setdefault(step.slot, {}),
            _lookup=probe_lookup(host, step, records, where, "image"),
            _batch=batch_cache.setdefault("lookup", probe_lookup(host, step, records, where, "batch")),
            _geometry=where,
        )))
    return out


def checked_keep(method, keep: torch.Tensor, n: int) -> torch.Tensor:
    """keep as a flat long tensor, after checking it is sorted, unique and within [0, n)."""
    keep = keep.to(torch.long).flatten()
    if keep.numel() and (bool((keep[1:] <= keep[:-1]).any()) or int(keep.min()) < 0 or int(keep.max()) >= n):
        raise PruneError(f"vtprune: {method.name} returned keep indices that are not sorted, unique and in range")
    return keep


def resolve(method, sel: Selection, view: ImageView) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(slots kept [k], replacement rows [k, D] or None, original indices for stats) of one selection;
    appended tokens take the lowest free slots."""
    keep = checked_keep(method, sel.keep, view.n).to(view.index.device)
    if sel.values is not None and sel.values.shape[0] != keep.numel():
        raise PruneError(f"vtprune: {method.name} gave {sel.values.shape[0]} replacement rows for {keep.numel()} kept tokens")
    if sel.extra_values is None:
        sources = sel.sources if sel.sources is not None else view.index[keep]
        return keep, sel.values, sources
    m = sel.extra_values.shape[0]
    free = torch.nonzero(~torch.isin(torch.arange(view.n, device=keep.device), keep)).flatten()[:m]
    if free.numel() < m:
        raise PruneError(f"vtprune: {method.name} keeps {keep.numel()} and appends {m} tokens; the image has {view.n}")
    slots = torch.sort(torch.cat([keep, free])).values
    values = torch.empty(slots.numel(), view.embeds.shape[-1], dtype=view.embeds.dtype, device=view.embeds.device)
    is_kept = torch.isin(slots, keep)
    values[is_kept] = (sel.values if sel.values is not None else view.embeds[keep]).to(values.dtype)
    values[~is_kept] = sel.extra_values.to(values.dtype)
    extra = sel.extra_index.to(view.index.device) if sel.extra_index is not None else view.index[free]
    sources = torch.unique(torch.cat([view.index[keep] if sel.sources is None else sel.sources, extra]))
    return slots, values, sources


def record_stage(fwd, step, stage: str, span, n_in: int, keep: torch.Tensor, sources: torch.Tensor, note=None) -> None:
    fwd.stats.images[span.image].stages.append(StageStats(
        stage, step.cut.layer if stage == "llm" else None, n_in, int(keep.numel()),
        [int(x) for x in sources.tolist() if int(x) >= 0], step.method.name, note,
    ))


def cut_tokens(host, fwd, step, prev: Layout, hidden: torch.Tensor, stage: str, answer=None):
    """Run ``step`` on ``prev``: returns (new layout with position ids, cut hidden states), or (None, hidden) when
    every image keeps all its tokens unchanged (a no-op cut builds nothing). ``answer``: precomputed (span, n_in,
    Selection) triples (the cut implied by vision-stage cuts)."""
    if answer is None:
        pairs = image_views(host, step, fwd, prev, hidden)
        selections = step.method.select_batch([v for _, v in pairs])
        if len(selections) != len(pairs):
            raise PruneError(f"vtprune: {step.method.name}.select_batch returned {len(selections)} selections for {len(pairs)} images")
        resolved = [(span, view.n, *resolve(step.method, sel, view)) for (span, view), sel in zip(pairs, selections)]
        notes = [sel.note for sel in selections]
    else:
        for span, n, _ in answer:  # the method received the whole image (its cuts ran inside the vision tower)
            fwd.received.setdefault((step.slot, span.image), n)
        resolved = [(span, n, checked_keep(step.method, sel.keep, n), sel.values,
                     prev.image_index[span.image][sel.keep]) for span, n, sel in answer]
        notes = [None] * len(resolved)
    for (span, n_in, keep, values, sources), note in zip(resolved, notes):
        if step.method.records_unchanged or keep.numel() != n_in or values is not None or note:
            record_stage(fwd, step, stage, span, n_in, keep, sources, note)
    if all(keep.numel() == n_in and values is None for _, n_in, keep, values, _ in resolved):
        return None, hidden
    keeps = {span.image: keep for span, _, keep, _, _ in resolved}  # images with no tokens left keep none
    empty = torch.zeros(0, dtype=torch.long, device=prev.valid.device)
    new, keep_index, counts = cut_layout(prev, fwd.spans, [keeps.get(s.image, empty) for s in fwd.spans])
    visual = visual_key_mask(new, fwd.spans, new.length)
    new.position_ids = cut_positions(prev, new, step.method.positions_at(step.cut), visual)
    in_place = not (hidden.requires_grad or fwd.keep_hidden_states)
    hidden = compact_tokens(hidden, keep_index, counts, in_place)
    for span, _, _, values, _ in resolved:
        if values is not None:
            hidden[span.sample, new.images[span.image]] = values.to(hidden.dtype)
    return new, hidden


def crop_views(host, step, run, hidden: torch.Tensor, crops_in_image: list[int]) -> list[ImageView]:
    """One view per crop of the vision batch at a vision cut (CLS excluded from ``index`` and ``embeds``)."""
    a, cuts = host.adapter, run.cuts
    n_patches = a.vision_seq_len - 1
    units = a.patch_units().to(hidden.device)
    per_unit = n_patches // int(units.max() + 1)
    views = []
    for c, index in enumerate(cuts.index):
        n = int(index.numel())
        key = (step.slot, c)
        where = CropSlice(c, n, cuts.last_cut, step.cut.layer)
        views.append(ImageView(
            sample=-1, image=c, index_in_sample=c, n_tokens=n_patches, index=index, embeds=hidden[c, 1:n + 1],
            cut=step.cut, nominal=n_patches, n_received=run.received.setdefault(key, n),
            model=host.plan.info, state=run.state.setdefault(key, {}), units=units[index],
            crops_in_image=crops_in_image[c], patches_per_unit=per_unit,
            _lookup=probe_lookup(host, step, run.records.get, where, "crop"),
        ))
    return views
