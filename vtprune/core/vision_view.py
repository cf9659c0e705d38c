"""The :class:`VisionView` of one image: feature-layer records mapped onto its LLM-side tokens (model geometry
from the adapter, never from a method)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import PruneError


@dataclass
class VisionView:
    """What the vision tower saw for one image, mapped onto that image's N LLM-side tokens.

    cls_attention: [N] attention the CLS query gives each token at the feature layer, summed over heads
        (and over the vision patches pooled into one token). keys: [N, d] head-averaged keys of that layer.
    pre_projector: [N, D_in] projector inputs (None where a token has none, e.g. newline tokens).
    cls_pre_projector: [D_in] the CLS vector in projector-input space, when the model allows it.
    project: maps [k, D_in] projector inputs to [k, D] LLM embeddings.

    Per-crop view, only for anyres models (LLaVA-NeXT; None elsewhere). C crops of P patches, crop 0 is the
    base (global) image, then the high-res grid crops row-major, as in the model's pixel batch:
    crop_cls: [C, P] CLS attention to each patch at the feature layer, summed over heads. crop_keys: [C, P, d]
    head-averaged patch keys of that layer. crop_features: [C, 1+P, D_in] projector inputs, CLS row first.
    crop_order: [C, P] rank of each patch in the model's packing with nothing unpadded and no newline tokens
    (base crop first, then the grid raster over all grid crops). crop_tokens: [C, P] the patch's token index
    (0..N-1) in the image, -1 where the model's unpadding dropped it.
    """

    cls_attention: torch.Tensor
    keys: torch.Tensor
    pre_projector: torch.Tensor | None
    cls_pre_projector: torch.Tensor | None
    project: Callable[[torch.Tensor], torch.Tensor] | None
    crop_cls: torch.Tensor | None = None
    crop_keys: torch.Tensor | None = None
    crop_features: torch.Tensor | None = None
    crop_order: torch.Tensor | None = None
    crop_tokens: torch.Tensor | None = None


def vision_view(record: dict, where, projector) -> VisionView:
    """``record``: the FeatureLayer record of the run (cls [crops, S], keys [crops, S, d], n_crops, hidden_cls
    [crops, D_v]); ``where``: the image's ImageSlice; ``projector``: the ``ProjectorInput()`` probe (handed in by
    ``FeatureLayer``, so this module does not import core/vision_probes.py, which imports it)."""
    a, fwd = where.adapter, where.forward
    if "cls" not in record:
        raise PruneError("vtprune: the vision tower's attention was not recorded (was pixel_values given?)")
    needed = sum(a.crops_per_image(fwd.vision_spans, fwd.image_sizes))
    if needed != record["n_crops"]:
        raise PruneError(
            f"vtprune: image-token count mismatch: the prompt's image tokens need {needed} vision crops/tiles "
            f"but the vision tower ran on {record['n_crops']}; build prompts with the model's processor"
        )
    crops = where.crops()
    n_crops, seq = crops.stop - crops.start, record["cls"].shape[1]
    cls, keys = record["cls"][crops], record["keys"][crops]
    src = where.sources(cls.device)  # [N, S]
    has, safe = src >= 0, src.clamp(min=0)
    cls_tok = (cls.reshape(-1)[safe] * has).sum(1)
    keys_tok = (keys.reshape(n_crops * seq, -1)[safe] * has[..., None]).sum(1) / has.sum(1, keepdim=True).clamp(min=1)
    projector_in = fwd.vision.records.get(projector)
    hidden_cls = record.get("hidden_cls")
    pre = project = cls_pre = None
    if projector_in is not None:
        pre = projector.for_image(projector_in, where)
        if pre is not None:
            project = a.projector
            if a.cls_in_projector_space and hidden_cls is not None and n_crops == 1:
                cls_pre = hidden_cls[crops.start]
    fields = dict(cls_attention=cls_tok, keys=keys_tok, pre_projector=pre, cls_pre_projector=cls_pre, project=project)
    fields.update(_crop_fields(record, where, projector_in, seq))
    return VisionView(**fields)


def _crop_fields(record, where, projector_in, seq) -> dict:
    """Anyres images (base crop + grid): each crop on its own, in projector-input space with its CLS row first."""
    a, fwd = where.adapter, where.forward
    geometry = a.anyres_geometry(fwd.source(where.span), fwd.image_sizes)
    hidden_cls = record.get("hidden_cls")
    if (geometry is None or projector_in is None or hidden_cls is None or not a.cls_in_projector_space
            or seq != a.vision_seq_len):
        return {}
    crops = where.crops()
    feats = projector_in[crops]
    if feats.shape[1] == seq - 1:  # the model dropped CLS: put its feature-layer vector back
        feats = torch.cat([hidden_cls[crops, None].to(feats.dtype), feats], 1)
    order, tokens = (g.to(feats.device) for g in geometry)
    return dict(crop_cls=record["cls"][crops, 1:], crop_keys=record["keys"][crops, 1:], crop_features=feats,
                crop_order=order, crop_tokens=tokens, project=a.projector)
