"""VisionZip (Yang et al., CVPR 2025), spec §4: dominant tokens by CLS attention + merged contextual tokens.

Algorithm (at the vision layer the model reads features from):
1. Dominant: score each patch by the attention the CLS query gives it, summed over heads; keep the top D-1
   patches plus the CLS token itself (official code), in original order, CLS first.
2. Contextual: among the remaining M patches pick C targets uniformly by position (step = max(1, M // C));
   assign every other remaining patch to the target whose head-averaged key is most cosine-similar;
   contextual token = target + mean(assigned) (empty clusters add 0).
3. The LLM receives [dominant ; contextual] with contiguous positions (``positions="renumber"``).

Budget: ``keep`` = D + C; ``dominant_fraction`` splits it (54/64 gives the paper's 54+10, 108+20, 162+30).
Model mapping (adapters): on LLaVA-1.5 the merge runs on projector inputs and includes the CLS vector, exactly
as the paper. On InternVL it runs on projector inputs after pixel shuffle (4 patches per token, no CLS vector
in that space: all D are patches). On LLaVA-NeXT (newline tokens have no projector input) it runs on the
projected embeddings, with each packed token scored by its source patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..registry import register
from .base import ImageView, Method, Selection, top_k_sorted


@register
@dataclass
class VisionZip(Method):
    dominant_fraction: float = 54 / 64
    positions: str = "renumber"

    name: ClassVar[str] = "visionzip"
    description: ClassVar[str] = "CLS-attention dominant tokens plus merged contextual tokens, cut before the LLM."
    stage: ClassVar[str] = "pre_llm"
    needs_vision: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < float(self.dominant_fraction) <= 1.0:
            raise ValueError(f"vtprune: visionzip dominant_fraction must be in (0, 1], got {self.dominant_fraction!r}")

    def score(self, image: ImageView) -> torch.Tensor:
        return image.vision.cls_attention[image.index]

    def select(self, image: ImageView, n_keep: int) -> Selection:
        v = image.vision
        in_pre_space = v.pre_projector is not None and v.project is not None
        feats = v.pre_projector[image.index] if in_pre_space else image.embeds
        with_cls = in_pre_space and v.cls_pre_projector is not None and n_keep >= 2
        n_dominant = max(1, min(n_keep, int(round(n_keep * float(self.dominant_fraction)))))
        n_contextual = n_keep - n_dominant
        n_patches = n_dominant - 1 if with_cls else n_dominant
        if with_cls and n_patches + n_contextual >= image.n:  # nothing left to merge: no room for CLS
            with_cls, n_patches = False, n_dominant
        dominant = top_k_sorted(self.score(image).float(), n_patches)
        rest_mask = torch.ones(image.n, dtype=torch.bool, device=dominant.device)
        rest_mask[dominant] = False
        rest = torch.nonzero(rest_mask).flatten()
        values = [feats[dominant]]
        targets = rest[:0]
        if n_contextual > 0 and rest.numel() > 0:
            step = max(1, rest.numel() // n_contextual)
            target_pos = torch.arange(0, rest.numel(), step, device=rest.device)[:n_contextual]
            targets = rest[target_pos]
            is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
            is_target[target_pos] = True
            members = rest[~is_target]
            keys = F.normalize(v.keys[image.index].float(), dim=-1)
            assign = (keys[members] @ keys[targets].T).argmax(-1) if members.numel() else members
            sums = torch.zeros(targets.numel(), feats.shape[-1], dtype=torch.float32, device=feats.device)
            sums.index_add_(0, assign, feats[members].float())
            counts = torch.bincount(assign, minlength=targets.numel()).clamp(min=1).unsqueeze(1)
            values.append((feats[targets].float() + sums / counts).to(feats.dtype))
        if with_cls:
            values.insert(0, v.cls_pre_projector[None].to(feats.dtype))
        values = torch.cat(values, 0)
        if in_pre_space:
            values = v.project(values)
        sources = torch.sort(torch.cat([dominant, targets])).values
        keep = sources
        if values.shape[0] > keep.numel():  # one extra slot carries the CLS vector
            free = torch.ones(image.n, dtype=torch.bool, device=keep.device)
            free[keep] = False
            keep = torch.sort(torch.cat([keep, torch.nonzero(free).flatten()[:1]])).values
        return Selection(keep=keep, values=values, sources=image.index[sources])
