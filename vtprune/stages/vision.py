"""Cut points ("vision", j): patches leave the vision tower between its layers (CLS always stays); when the
tower ends, survivors are scattered back to their grid positions so the model's own feature selection, pixel
shuffle, projector and anyres packing run unchanged. The LLM-input cut then drops the tokens built only from
pruned patches (:func:`survivors`)."""

from __future__ import annotations

import torch

from ..core.context import CropCuts, VisionRun
from ..core.stats import StageStats
from ..errors import PruneError
from ..kernels import compact_
from ..methods.base import Selection
from .cut import checked_keep, crop_views


def before_layer(host, run: VisionRun, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the plan's cuts before vision layer ``layer`` on [crops, 1+n, D]; returns the hidden states and the
    additive key mask the layer needs (None while every crop keeps the same count)."""
    if run.cuts is None:
        run.cuts = CropCuts(index=[torch.arange(hidden.shape[1] - 1, device=hidden.device)] * hidden.shape[0])
    for step in host.plan.vision.get(layer, ()):
        hidden = _cut(host, run, step, hidden)
    return hidden, run.cuts.mask


def _crops_in_image(host, run: VisionRun, crops: int) -> list[int]:
    per_image = host.adapter.crop_counts(run.pixel_values, run.image_sizes) if run.pixel_values is not None else []
    return [c for c in per_image for _ in range(c)] if sum(per_image) == crops else [1] * crops


def _cut(host, run: VisionRun, step, hidden: torch.Tensor) -> torch.Tensor:
    cuts = run.cuts
    views = crop_views(host, step, run, hidden, _crops_in_image(host, run, hidden.shape[0]))
    selections = step.method.select_batch(views)
    keeps = []
    for v, sel in zip(views, selections):
        keep = checked_keep(step.method, sel.keep, v.n).to(hidden.device)
        if keep.numel() == 0:
            raise PruneError(f"vtprune: {step.method.name} kept no patch of a crop; keep at least one")
        keeps.append(keep)
    cuts.stages.append((step.method.name, step.cut.layer, [v.n for v in views], [k.numel() for k in keeps],
                        [cuts.index[c][k].tolist() for c, k in enumerate(keeps)]))
    cuts.index = [cuts.index[c][k] for c, k in enumerate(keeps)]
    cuts.last_cut = step.cut.layer
    if all(k.numel() == v.n for k, v in zip(keeps, views)):
        return hidden  # nothing cut: no compaction, no mask
    counts = torch.tensor([1 + k.numel() for k in keeps], device=hidden.device)
    K = int(counts.max())
    index = torch.zeros(hidden.shape[0], K, dtype=torch.long, device=hidden.device)
    for c, keep in enumerate(keeps):
        index[c, 1 : 1 + keep.numel()] = keep + 1  # CLS (row 0) always stays
    if hidden.requires_grad:
        hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
    else:
        hidden = compact_(hidden, index, dim=1, counts=counts)
    cuts.mask = None if bool((counts == K).all()) else _ragged_mask(counts, K, hidden.dtype)
    return hidden


def _ragged_mask(counts: torch.Tensor, K: int, dtype) -> torch.Tensor:
    """[crops, 1, K, K] additive mask hiding the padded keys of crops that keep fewer than K rows."""
    valid = torch.arange(K, device=counts.device)[None] < counts[:, None]
    mask = torch.zeros(counts.numel(), 1, K, K, dtype=dtype, device=counts.device)
    return mask.masked_fill(~valid[:, None, None, :], torch.finfo(dtype).min)


def layer_inputs(host, args, kwargs, hidden, mask):
    """The vision layer's (args, kwargs) with the cut hidden states and, for ragged crops, the key mask."""
    if mask is not None:
        if args and len(args) >= 2:
            args = (hidden, mask) + tuple(args[2:])
        elif "attention_mask" in kwargs or len(args) == 1 and host.adapter.vision_layer_takes_mask:
            kwargs["attention_mask"] = mask
        else:
            raise PruneError(
                "vtprune: this vision tower takes no attention mask, so every crop must keep the same number of "
                "patches (use the method's shared prune count)"
            )
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs


def after_tower(host, run: VisionRun, output):
    """Scatter the surviving patches back to their grid positions (zeros elsewhere); remember which survived."""
    cuts = run.cuts
    S, crops = host.adapter.vision_seq_len, len(cuts.index)
    counts = [1 + idx.numel() for idx in cuts.index]
    K = max(counts)
    device = cuts.index[0].device
    full_index = torch.zeros(crops, K, dtype=torch.long, device=device)
    row_valid = torch.zeros(crops, K, dtype=torch.bool, device=device)
    for c, idx in enumerate(cuts.index):
        full_index[c, 1 : counts[c]] = idx + 1
        row_valid[c, : counts[c]] = True
    cuts.keep = torch.zeros(crops, S, dtype=torch.bool, device=device).scatter_(1, full_index, row_valid)
    cuts.keep[:, 0] = True

    def restore(x):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] == S:
            return x
        if x.shape[1] != K:
            raise PruneError("vtprune: vision hidden states were cut at more than one granularity")
        src = x * row_valid[..., None].to(x.dtype)  # padded rows must not overwrite CLS (index 0)
        return x.new_zeros(x.shape[0], S, x.shape[2]).scatter_add(1, full_index[..., None].expand(-1, -1, x.shape[2]), src)

    if getattr(output, "last_hidden_state", None) is not None:
        output.last_hidden_state = restore(output.last_hidden_state)
    if getattr(output, "hidden_states", None) is not None:
        output.hidden_states = tuple(restore(h) for h in output.hidden_states)
    return output


def survivors(host, fwd) -> list[tuple[object, int, Selection]]:
    """The LLM-input cut implied by the vision cuts: keep a token if any of its vision sources survived.
    Also records every vision cut in stats (as seen by the image's first crop)."""
    run = fwd.vision
    if run is None or run.cuts is None or run.cuts.keep is None:
        raise PruneError("vtprune: the vision stage did not run (was pixel_values given?)")
    out = []
    for span, (first, n_crops) in zip(fwd.spans, fwd.crop_ranges(host.adapter)):
        alive = run.cuts.keep[first:first + n_crops].reshape(-1)
        src = host.adapter.token_sources(fwd.source(span), fwd.image_sizes).to(alive.device)
        kept = (alive[src.clamp(min=0)] & (src >= 0)).any(1)
        out.append((span, span.length, Selection(keep=torch.nonzero(kept).flatten())))
        for name, layer, n_in, n_out, index in run.cuts.stages:
            fwd.stats.images[span.image].stages.append(StageStats("vision", layer, n_in[first], n_out[first], index[first], name))
    return out
