"""VTC-CLS ("[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs"), spec §2.

One cut after the vision encoder: score each visual token by the CLS query's attention to it, averaged over
heads and summed over vision layers ``start_layer .. s`` (s = the layer the model reads features from; the
CLS column is dropped without renormalising, as the official code), keep the top-U in raster order, and feed
them to the LLM with contiguous positions.

``start_layer`` defaults to the official CLI default ``--layer 16`` (K = 7 layers ensembled on 24-layer
CLIP-L). A third-party summary reports K = 3 (start 20) as the paper's optimum; it is unverified, so the code
default stays and ``start_layer=20`` reaches the other reading. Negative values count back from s
(``start_layer=-2`` ensembles the last 3 layers). For a tower shallower than ``start_layer`` the start is
clamped to 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..registry import register
from .base import ImageView, Method


@register
@dataclass
class VTCCLS(Method):
    start_layer: int = 16
    positions: str = "renumber"

    name: ClassVar[str] = "vtc_cls"
    description: ClassVar[str] = "CLS attention ensembled over the last vision layers; one cut before the projector."
    stage: ClassVar[str] = "pre_llm"
    needs_vision: ClassVar[bool] = True

    def layers(self, feature_layer: int) -> range:
        start = feature_layer + self.start_layer if self.start_layer < 0 else self.start_layer
        return range(max(0, min(start, feature_layer)), feature_layer + 1)

    def vision_observe_layers(self, n_layers: int, feature_layer: int) -> tuple[int, ...]:
        return tuple(self.layers(feature_layer))

    def score(self, image: ImageView) -> torch.Tensor:
        per_layer = image.vision.layer_cls
        return torch.stack([per_layer[l] for l in sorted(per_layer)]).sum(0)[image.index]
