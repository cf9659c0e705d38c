"""Vision probes (vision tower; one record per run of ``get_image_features``): ``VisionCLS``, ``VisionValues``,
``VisionAttentionMap``, ``ProjectorInput``, ``FeatureLayer``, ``PatchEntropy``; see :mod:`.probes`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .probe_base import CropSlice, ImageSlice, Probe, _check_vision, _masked_logits, _scaling
from .vision_view import vision_view


def _cls_row(query, key, mask, kwargs) -> torch.Tensor:
    """[crops, H, n+1] attention probabilities of the CLS query (row 0)."""
    logits = (query[:, :, :1].float() @ key.float().transpose(-1, -2)) * _scaling(query, kwargs)
    return _masked_logits(logits, mask, slice(0, 1), key.shape[2]).softmax(-1)[:, :, 0]


def _vision_attention(host, layers, record):
    """Put ``record(run_records, layer, module, q, k, v, mask, kwargs)`` in the chain of each vision layer."""
    a = host.adapter
    for j in layers:
        def fn(next, module, query, key, value, attention_mask, j=j, **kwargs):
            run = host.vision_run()
            if run is not None:
                record(run.records, j, query, key, value, attention_mask, kwargs)
            return next(module, query, key, value, attention_mask, **kwargs)

        host.hooks.attention(a.vision_attention(a.vision_layers[j]), fn, "record")


@dataclass(frozen=True)
class _VisionLayers(Probe):
    """Base of the probes recording something per vision layer: ``record`` is {layer: [crops, ...]}."""

    layers: tuple[int, ...]
    scope: ClassVar[str] = "vision"

    def check(self, info):
        _check_vision(self, self.layers, info)

    @staticmethod
    def since_last_cut(record, where: CropSlice):
        """(layer, [crops, ...]) recorded in [the previous vision cut, this one): their rows have this crop's n."""
        return [(l, r) for l, r in sorted(record.items()) if where.since <= l < where.until]

    @staticmethod
    def full_grid(record, where: ImageSlice):
        """(layer, [crops, ...]) recorded before any vision cut (the full S-position grid)."""
        return [(l, r) for l, r in sorted(record.items()) if r.shape[-1] == where.adapter.vision_seq_len]


@dataclass(frozen=True)
class VisionCLS(_VisionLayers):
    """At a vision cut: {layer: [H, n+1]} CLS row (CLS column first) for layers in [previous cut, this cut). At an
    LLM-side cut: {layer: [N]} head-mean CLS attention summed over each token's patches (full-grid layers only)."""

    def attach(self, host):
        def record(records, j, query, key, value, mask, kwargs):
            rec = records.setdefault(self, {})
            if j not in rec:
                rec[j] = _cls_row(query, key, mask, kwargs)

        _vision_attention(host, self.layers, record)

    def for_crop(self, record, where):
        return {l: r[where.crop][:, : where.n + 1] for l, r in self.since_last_cut(record, where)}

    def for_image(self, record, where):
        return {l: where.to_tokens(r[where.crops()].mean(1).reshape(-1)) for l, r in self.full_grid(record, where)}


@dataclass(frozen=True)
class VisionValues(_VisionLayers):
    """At a vision cut: {layer: [H, n+1, d]} value vectors (CLS first) for layers in [previous cut, this cut)."""

    def attach(self, host):
        def record(records, j, query, key, value, mask, kwargs):
            records.setdefault(self, {}).setdefault(j, value.float())

        _vision_attention(host, self.layers, record)

    def for_crop(self, record, where):
        return {l: r[where.crop][:, : where.n + 1] for l, r in self.since_last_cut(record, where)}


@dataclass(frozen=True)
class VisionAttentionMap(_VisionLayers):
    """Head-mean attention map (``per_head=True``: every head). At a vision cut: {layer: [(H,) n+1, n+1]} (CLS
    first); at an LLM-side cut: {layer: [crops, (H,) S, S]} over the image's crops (full-grid layers only)."""

    per_head: bool = False

    def attach(self, host):
        def record(records, j, query, key, value, mask, kwargs):
            rec = records.setdefault(self, {})
            if j not in rec:
                logits = (query.float() @ key.float().transpose(-1, -2)) * _scaling(query, kwargs)
                probs = _masked_logits(logits, mask, slice(None), key.shape[2]).softmax(-1)
                rec[j] = probs if self.per_head else probs.mean(1)

        _vision_attention(host, self.layers, record)

    def for_crop(self, record, where):
        k = where.n + 1
        return {l: r[where.crop][..., :k, :k] for l, r in self.since_last_cut(record, where)}

    def for_image(self, record, where):
        return {l: r[where.crops()] for l, r in self.full_grid(record, where)}


@dataclass(frozen=True)
class ProjectorInput(Probe):
    """[N, D_in] the model's own projector input row of each token, or None when a token has none (newlines)."""

    scope: ClassVar[str] = "vision"

    def attach(self, host):
        def record(module, args):
            run = host.vision_run()
            if run is not None and self not in run.records:  # the model's call only: methods may project merges
                run.records[self] = args[0]

        host.hooks.pre(host.adapter.projector, record, with_kwargs=False)

    def for_image(self, record, where):
        rows = where.adapter.projector_rows(where.forward.source(where.span), where.forward.image_sizes)
        crops = where.crops()
        flat = record[crops].reshape(-1, record.shape[-1])
        return flat[rows.to(flat.device)] if bool((rows >= 0).all()) else None


@dataclass(frozen=True)
class FeatureLayer(Probe):
    """The :class:`~vtprune.core.vision_view.VisionView` of an image at the feature layer the model reads: CLS
    attention and keys mapped onto its tokens, projector inputs, the CLS vector, per-crop views on anyres."""

    scope: ClassVar[str] = "vision"

    def attach(self, host):
        a = host.adapter
        feature = a.vision_feature_layer

        def record(records, j, query, key, value, mask, kwargs):
            rec = records.setdefault(self, {})
            if "cls" not in rec:
                rec.update(cls=_cls_row(query, key, mask, kwargs).sum(1), keys=key.float().mean(1), n_crops=query.shape[0])

        def hidden(module, args, output):
            run = host.vision_run()
            if run is not None:
                out = output[0] if isinstance(output, tuple) else output
                run.records.setdefault(self, {}).setdefault("hidden_cls", out[:, 0])

        _vision_attention(host, (feature,), record)
        host.hooks.post(a.vision_layers[feature], hidden)
        ProjectorInput().attach(host)

    def for_image(self, record, where):
        return vision_view(record, where, ProjectorInput())  # model geometry: built in core/vision_view.py


@dataclass(frozen=True)
class PatchEntropy(Probe):
    """[crops, P] information entropy (bits, 0..8) of each vision patch of the image's crops: the pixels the tower
    saw, de-normalised with the adapter's mean / std to 0..255, grey = channel mean, a 256-bin histogram."""

    scope: ClassVar[str] = "vision"

    def attach(self, host):
        def record(module, args, kwargs):
            run = host.vision_run()
            if run is not None and self not in run.records:
                run.records[self] = args[0] if args else kwargs["pixel_values"]

        host.hooks.pre(host.adapter.vision_tower, record)

    def for_image(self, record, where):
        a = where.adapter
        pixels = record[where.crops()].float()
        mean = torch.tensor(a.pixel_mean, device=pixels.device)[:, None, None]
        std = torch.tensor(a.pixel_std, device=pixels.device)[:, None, None]
        grey = ((pixels * std + mean) * 255).mean(1).round().clamp(0, 255).long()  # [crops, H, W]
        side = int(round((a.vision_seq_len - 1) ** 0.5))
        p = grey.shape[-1] // side
        patches = grey.unfold(1, p, p).unfold(2, p, p).reshape(grey.shape[0], side * side, p * p)
        counts = torch.zeros(*patches.shape[:2], 256, device=grey.device).scatter_add_(
            2, patches, torch.ones_like(patches, dtype=torch.float))
        prob = counts / (p * p)
        return -(prob * torch.log2(prob + 1e-10)).sum(-1)
