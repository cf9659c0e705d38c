"""Pre-LLM selection on tensors captured outside transformers (the vLLM plugin), spec serving_eval.md §1.5.

vLLM runs LLaVA-1.5's CLIP tower and projector itself; this module hands what they computed for one image to the
method's own ``budget`` / ``select`` through the same :class:`ImageView` / :class:`VisionView` the HF path builds,
and turns the :class:`Selection` into exactly k LLM rows (``stages.cut.resolve``, the HF path's own resolution).
No selection code lives here. Needs torch only (no vLLM), so it is tested in the main environment too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..core.probes import FeatureLayer, VisionCLS
from ..core.vision_probes import _cls_row
from ..errors import PruneError
from ..methods.base import Cut, ImageView, Method, ModelInfo, VisionView
from ..stages.cut import resolve


@dataclass
class Captured:
    """One LLaVA-1.5 image as the vision tower saw it (S = 1 + N positions, CLS first).

    cls_rows: {vision layer: [H, S]} attention probabilities of the CLS query in that layer.
    keys: [H, S, d] keys of the feature layer. hidden_cls: [D_v] the feature layer's CLS output.
    features: [N, D_v] projector inputs. project: maps [k, D_v] projector inputs to [k, D] LLM rows.
    """

    cls_rows: dict[int, torch.Tensor]
    keys: torch.Tensor
    hidden_cls: torch.Tensor
    features: torch.Tensor
    project: Callable[[torch.Tensor], torch.Tensor]


def cls_attention_rows(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """[B, H, S] CLS-query attention probabilities from [B, H, S, d] queries / keys: the HF probe's own formula
    (vLLM's encoder attention returns no probabilities, so they are recomputed from the captured q / k)."""
    return _cls_row(query, key, None, {})


def image_view(info: ModelInfo, cap: Captured, n_tokens: int | None = None) -> ImageView:
    """The pre_llm :class:`ImageView` of one image: what the HF path's FeatureLayer / VisionCLS probes give.
    The image is the first of its sample (vLLM encodes an image once, whatever prompt it is in)."""
    n = cap.features.shape[0] if n_tokens is None else n_tokens
    vision = VisionView(cls_attention=cap.cls_rows[info.feature_layer].sum(0)[1:], keys=cap.keys.float().mean(0)[1:],
                        pre_projector=cap.features, cls_pre_projector=cap.hidden_cls, project=cap.project)

    def lookup(probe):
        if probe == FeatureLayer():
            return vision
        if isinstance(probe, VisionCLS):
            missing = [l for l in probe.layers if l not in cap.cls_rows]
            if missing:
                raise PruneError(f"vtprune: vision layers {missing} were not captured by the vLLM plugin")
            return {l: cap.cls_rows[l].mean(0)[1:] for l in probe.layers}
        raise PruneError(f"vtprune: the vLLM plugin records no {type(probe).__name__}")

    return ImageView(sample=0, image=0, index_in_sample=0, n_tokens=n, index=torch.arange(n),
                     embeds=cap.project(cap.features), cut=Cut("pre_llm"), nominal=info.nominal_tokens,
                     n_received=n, model=info, _lookup=lookup)


def kept_rows(method: Method, info: ModelInfo, cap: Captured) -> torch.Tensor:
    """[k, D] the LLM rows the method keeps for one image (k = :func:`kept_count`), in the order HF feeds them."""
    view = image_view(info, cap)
    (sel,) = method.select_batch([view])
    keep, values, _ = resolve(method, sel, view)
    rows = values if values is not None else view.embeds[keep]
    expected = kept_count(method, info)
    if rows.shape[0] != expected:
        raise PruneError(f"vtprune: {method.name} kept {rows.shape[0]} tokens of an image, the prompt holds "
                         f"{expected} placeholders for it")
    return rows.to(view.embeds.dtype)


def kept_count(method: Method, info: ModelInfo) -> int:
    """k, the image's placeholder count: the method's own ``budget`` for an N-token image (N = the model's
    nominal count on LLaVA-1.5, a pure function of the config), computed on a shape-only view."""
    n = info.nominal_tokens
    shape_only = Captured(cls_rows={l: torch.zeros(1, n + 1) for l in range(info.feature_layer + 1)},
                          keys=torch.zeros(1, n + 1, 1), hidden_cls=torch.zeros(1), features=torch.zeros(n, 1),
                          project=lambda x: x)
    k = method.budget(image_view(info, shape_only))
    return n if k is None else int(k)
