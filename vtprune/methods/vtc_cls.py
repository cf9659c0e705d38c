"""VTC-CLS ("[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs"), spec §2.

One cut after the vision encoder: score each visual token by the CLS query's attention to it, averaged over
heads and summed over vision layers ``start_layer .. s`` (s = the layer the model reads features from; the
CLS column is dropped without renormalising, as the official code), keep the top-U in raster order, and feed
them to the LLM with contiguous positions.

``start_layer`` indexes the tower's layers like the official ``attentions[start_layer:-1]`` (24 CLIP-L
layers, s = 22): the layers are ``range(n_layers)[start_layer : s + 1]``, so a negative value counts back
from the tower's last layer (``-2`` = layer 22 alone on LLaVA-1.5; ``-1`` is the unread last layer there,
an error). A start past s, or before layer 0 (``start_layer < -n_layers``, which a slice would clamp), is an
error at ``prune()`` naming the numbers, never a clamp.
The default (None) is the official CLI default ``--layer 16`` on a 24-layer tower (K = 7 layers, 16..22 on
CLIP-L, 16..23 on InternViT-300M, which reads its last layer) and the same relative depth
(``n_layers * 16 // 24``, at most s) on other towers, so it also fits shallow test towers. A third-party
summary reports K = 3 (start 20) as the paper's optimum; it is unverified, ``start_layer=20`` reaches it.

Towers without a CLS token (Qwen-VL, spec qwen_vl.md §1.3): the score is the attention each token receives in one
full-attention vision block (``vision_block``, default the last full one; ``ReceivedAttention``), the community
ports' substitute for CLS attention; ``start_layer`` does not apply there. On CLS towers ``vision_block`` must
stay None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..core.registration import register
from ..space import Int, tuned
from ..core.probes import ReceivedAttention, VisionCLS
from .base import ImageView, Method

OFFICIAL_START, OFFICIAL_DEPTH = 16, 24  # --layer 16 of CLIP-L's 24 layers


@register
@dataclass
class VTCCLS(Method):
    start_layer: int | None = tuned(None, Int(0, lambda _, model: model.feature_layer,  # search: 0 .. s
                                              derive=lambda m, info: m.layers(info.vision_layers, info.feature_layer).start))
    positions: str = "renumber"
    vision_block: int | None = None  # towers without CLS (Qwen-VL): the full-attention block scored; None: last

    name: ClassVar[str] = "vtc_cls"
    description: ClassVar[str] = "CLS attention ensembled over the last vision layers; one cut before the projector."

    def layers(self, n_layers: int, feature_layer: int) -> range:
        """Vision layers ensembled: ``range(n_layers)[start_layer : feature_layer + 1]`` (see the module doc)."""
        if self.start_layer is None:
            return range(min(n_layers * OFFICIAL_START // OFFICIAL_DEPTH, feature_layer), feature_layer + 1)
        start = self.start_layer + n_layers if self.start_layer < 0 else self.start_layer
        if not 0 <= start <= feature_layer:
            as_layer = f" (vision layer {start})" if self.start_layer < 0 else ""
            problem = "before the first layer" if start < 0 else f"past the feature layer {feature_layer} the model reads"
            raise ConfigError(
                f"vtprune: vtc_cls start_layer={self.start_layer}{as_layer} is {problem} "
                f"(tower layers 0..{n_layers - 1}); use 0..{feature_layer}, "
                f"{-n_layers}..{feature_layer - n_layers} counting back, or the default"
            )
        return range(start, feature_layer + 1)

    def probes(self, model):
        if not model.vision_cuts:  # no CLS token: attention received in a full block (module doc)
            if self.start_layer is not None:
                raise ConfigError(f"vtprune: vtc_cls start_layer applies to CLS towers; {model.family} has no CLS "
                                  "token and is scored by received attention: set vision_block instead")
            return (ReceivedAttention(self.vision_block),)
        if self.vision_block is not None:
            raise ConfigError(f"vtprune: vtc_cls vision_block is for towers without CLS (Qwen-VL); {model.family} "
                              "is scored by CLS attention over start_layer..: drop vision_block")
        return (VisionCLS(tuple(self.layers(model.vision_layers, model.feature_layer))),)

    def score(self, image: ImageView) -> torch.Tensor:
        (probe,) = self.probes(image.model)
        if isinstance(probe, ReceivedAttention):
            return image[probe]["scores"]
        per_layer = image[probe]
        return torch.stack([per_layer[l] for l in sorted(per_layer)]).sum(0)[image.index]
