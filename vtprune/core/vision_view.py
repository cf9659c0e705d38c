"""The :class:`VisionView` of one image: feature-layer records mapped onto its LLM-side tokens (model geometry
from the adapter, never from a method)."""

from __future__ import annotations

import torch

from ..errors import PruneError
from ..methods.base import VisionView
from .probes import ProjectorInput


def vision_view(record: dict, where) -> VisionView:
    """``record``: the FeatureLayer record of the run (cls [crops, S], keys [crops, S, d], n_crops, hidden_cls
    [crops, D_v]); ``where``: the image's ImageSlice."""
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
    projector_in = fwd.vision.records.get(ProjectorInput())
    hidden_cls = record.get("hidden_cls")
    pre = project = cls_pre = None
    if projector_in is not None:
        pre = ProjectorInput().for_image(projector_in, where)
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
