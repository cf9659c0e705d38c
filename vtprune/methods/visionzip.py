"""VisionZip (Yang et al., CVPR 2025), spec §4: dominant tokens by CLS attention + merged contextual tokens.

Algorithm (at the vision layer the model reads features from, spec §4.2):
1. Dominant: score each patch by the attention the CLS query gives it, summed over heads; keep the top D-1
   patches plus the CLS token itself (official code), in original order, CLS first.
2. Contextual: among the remaining M patches pick C targets uniformly by position (step = max(1, M // C));
   assign every other remaining patch to the target whose head-averaged key is most cosine-similar;
   contextual token = target + mean(assigned) (empty clusters add 0).
3. The LLM receives [dominant ; contextual] with contiguous positions (``positions="renumber"``).

Budget: ``keep`` = D + C; ``dominant_fraction`` splits it (54/64 gives the paper's 54+10, 108+20, 162+30).
Model mapping (adapters): on LLaVA-1.5 the merge runs on projector inputs and includes the CLS vector, exactly
as the paper. On InternVL it runs on projector inputs after pixel shuffle (4 patches per token, no CLS vector
in that space: all D are patches); its tiles are pooled into one image-level selection.

LLaVA-NeXT, ``anyres="per_crop"`` (default; official ``llava_arch.py``/``clip_encoder.py``): the budget is per
crop. ``keep``/``ratio`` give T = D + C per crop as for one 576-patch image (``keep=32`` or ``ratio=0.944``:
27+5 per crop, Table 9's 160 = 5 x 32; 64: 54+10 -> 320; 128: 108+20 -> 640); an image gets crops x T
tokens, T capped so that this fits the image's N placeholder tokens. Every crop keeps its own CLS + D-1
patches + C contextual tokens, merged on projector inputs, then projected. Token order as the official code:
base crop [CLS, dominant, contextual], then the grid crops' dominant patches in the raster of the whole
grid, their CLS vectors (crop order), their contextual tokens (crop by crop). Where HF differs: HF unpads
the grid and adds one ``image_newline`` per row; the official multi-crop path does neither. We follow the
official code: patches in regions HF unpads away are candidates too (stats report only kept patches that
have an HF token), and no newline token is emitted. ``anyres="global"``: one top-D over the packed image
(newlines never kept), no CLS, merged after the projector (``keep`` scales with the image's N).

Towers without a CLS token (Qwen-VL, spec qwen_vl.md §1.3, as the LightCompress port): dominant tokens by the
attention they receive in one full-attention vision block (``vision_block``, default the last full one), keys for
the contextual merge are that block's head-mean keys averaged over each token's 2x2 patches, and the merge runs on
the LLM input embeddings (after the merger). Every value stays at its own token's slot (a contextual token at its
target's), so M-RoPE keeps each token's (t, h, w); on Qwen3-VL a contextual token keeps its target's own DeepStack
features (the model defines none for merged tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..budget import tokens_to_keep
from ..core.probes import FeatureLayer, ReceivedAttention
from ..core.registration import register
from ..space import Choice, Float, tuned
from .base import ImageView, Method, Selection, VisionView, top_k_sorted

ANYRES_MODES = ("per_crop", "global")


@register
@dataclass
class VisionZip(Method):
    dominant_fraction: float = tuned(54 / 64, Float(0.5, 1.0))
    anyres: str = tuned("per_crop", Choice(ANYRES_MODES, only_for=("llava_next",)))
    positions: str = "renumber"
    vision_block: int | None = None  # towers without CLS (Qwen-VL): the full-attention block scored; None: last

    name: ClassVar[str] = "visionzip"
    description: ClassVar[str] = "CLS-attention dominant tokens plus merged contextual tokens, cut before the LLM."

    def check_fields(self) -> None:
        if not 0.0 < self.dominant_fraction <= 1.0:
            raise self.field_error("dominant_fraction", "a number in (0, 1] (share of D in the D + C budget; 54/64)")
        if self.anyres not in ANYRES_MODES:
            raise self.field_error("anyres", "'per_crop' (official LLaVA-NeXT budget per crop) or 'global'")

    def split(self, n_keep: int) -> tuple[int, int]:
        """(D, C): dominant (CLS included) and contextual tokens of an ``n_keep`` budget."""
        n_dominant = max(1, min(n_keep, int(round(n_keep * float(self.dominant_fraction)))))
        return n_dominant, n_keep - n_dominant

    def _per_crop(self, v: VisionView) -> bool:
        return self.anyres == "per_crop" and v.crop_cls is not None

    def probes(self, model):
        if not model.vision_cuts:
            return (ReceivedAttention(self.vision_block),)
        if self.vision_block is not None:
            raise self.field_error("vision_block", f"None on {model.family}, which has a CLS token (the block is for "
                                                   "towers without CLS, Qwen-VL)")
        return (FeatureLayer(),)

    def budget(self, image: ImageView) -> int:
        if not image.vision_cuts:
            return super().budget(image)
        v = image.vision
        if not self._per_crop(v):
            return super().budget(image)
        crops, patches = v.crop_cls.shape
        per_crop = tokens_to_keep(patches, self.ratio, self.keep, image.nominal, self.name)
        return min(image.n, crops * max(1, min(per_crop, image.n_tokens // crops)))

    def select(self, image: ImageView, n_keep: int) -> Selection:
        if not image.vision_cuts:
            return self._select_received(image, n_keep)
        v = image.vision
        if self._per_crop(v):
            return self._select_per_crop(image, v, n_keep)
        return self._select_global(image, v, n_keep)

    def _select_per_crop(self, image: ImageView, v: VisionView, n_keep: int) -> Selection:
        """Spec §4.2 on every crop; [k = crops x T, D] values in the official LLaVA-NeXT order."""
        crops = v.crop_cls.shape[0]
        n_dominant, n_contextual = self.split(n_keep // crops)
        cls, dom, ctx, ranks, sources = [], [], [], [], []
        for c in range(crops):
            feats = v.crop_features[c]  # [1+P, D_in], CLS row first
            dominant = top_k_sorted(v.crop_cls[c].float(), n_dominant - 1)
            rest = _others(dominant, feats.shape[0] - 1)
            targets, merged = _contextual(feats[1:], v.crop_keys[c], rest, n_contextual)
            cls.append(feats[:1])
            dom.append(feats[1:][dominant])
            ctx.append(merged)
            ranks.append(v.crop_order[c][dominant])
            sources.append(v.crop_tokens[c][torch.cat([dominant, targets])])
        values = [cls[0], dom[0], ctx[0]]
        if crops > 1:  # grid crops: dominant patches in the whole grid's raster, then CLS, then contextual
            grid_dom = torch.cat(dom[1:])
            values += [grid_dom[torch.argsort(torch.cat(ranks[1:]))]] + cls[1:] + ctx[1:]
        values = v.project(torch.cat(values))
        sources = torch.sort(torch.cat(sources)).values
        sources = sources[sources >= 0]  # patches HF unpads away have no token to report
        return Selection(keep=_slots(image.index, sources, values.shape[0]), values=values, sources=sources)

    def _select_global(self, image: ImageView, v: VisionView, n_keep: int) -> Selection:
        """One selection over the image's N tokens (LLaVA-1.5, InternVL, LLaVA-NeXT ``anyres="global"``)."""
        in_pre_space = v.pre_projector is not None and v.project is not None
        feats = v.pre_projector[image.index] if in_pre_space else image.embeds
        with_cls = in_pre_space and v.cls_pre_projector is not None and n_keep >= 2
        n_dominant, n_contextual = self.split(n_keep)
        n_patches = n_dominant - 1 if with_cls else n_dominant
        if with_cls and n_patches + n_contextual >= image.n:  # nothing left to merge: no room for CLS
            with_cls, n_patches = False, n_dominant
        dominant = top_k_sorted(v.cls_attention[image.index].float(), n_patches)
        targets, merged = _contextual(feats, v.keys[image.index], _others(dominant, image.n), n_contextual)
        values = [feats[dominant], merged]
        if with_cls:
            values.insert(0, v.cls_pre_projector[None].to(feats.dtype))
        values = torch.cat(values, 0)
        if in_pre_space:
            values = v.project(values)
        sources = torch.sort(torch.cat([dominant, targets])).values
        return Selection(keep=_slots(torch.arange(image.n, device=sources.device), sources, values.shape[0]),
                         values=values, sources=image.index[sources])


    def _select_received(self, image: ImageView, n_keep: int) -> Selection:
        """Towers without CLS (module doc): received-attention dominant tokens, contextual tokens merged on the
        LLM input embeddings; each value at its own token's slot."""
        rec = image[ReceivedAttention(self.vision_block)]
        n_dominant, n_contextual = self.split(n_keep)
        dominant = top_k_sorted(rec["scores"].float(), n_dominant)
        targets, merged = _contextual(image.embeds, rec["keys"], _others(dominant, image.n), n_contextual)
        order = torch.argsort(torch.cat([dominant, targets]))
        keep = torch.cat([dominant, targets])[order]
        return Selection(keep=keep, values=torch.cat([image.embeds[dominant], merged])[order])


def _others(chosen: torch.Tensor, n: int) -> torch.Tensor:
    """[n - len(chosen)] sorted indices in 0..n-1 not in ``chosen``."""
    rest = torch.ones(n, dtype=torch.bool, device=chosen.device)
    rest[chosen] = False
    return torch.nonzero(rest).flatten()


def _contextual(feats: torch.Tensor, keys: torch.Tensor, rest: torch.Tensor, n: int):
    """Spec §4.2 step 2 over rows ``rest`` of feats [*, D_in] / keys [*, d]: (targets [c], merged [c, D_in])
    with c = min(n, len(rest)); merged = feats[target] + mean(feats of the rows assigned to it)."""
    if n <= 0 or rest.numel() == 0:
        return rest[:0], feats[:0]
    step = max(1, rest.numel() // n)
    target_pos = torch.arange(0, rest.numel(), step, device=rest.device)[:n]
    is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
    is_target[target_pos] = True
    targets, members = rest[target_pos], rest[~is_target]
    keys = F.normalize(keys.float(), dim=-1)
    assign = (keys[members] @ keys[targets].T).argmax(-1) if members.numel() else members
    sums = torch.zeros(targets.numel(), feats.shape[-1], dtype=torch.float32, device=feats.device)
    sums.index_add_(0, assign, feats[members].float())
    counts = torch.bincount(assign, minlength=targets.numel()).clamp(min=1).unsqueeze(1)
    return targets, (feats[targets].float() + sums / counts).to(feats.dtype)


def _slots(index: torch.Tensor, sources: torch.Tensor, k: int) -> torch.Tensor:
    """[k] sorted slots among the image's current tokens (``index``: their original indices) for k values:
    the slots of ``sources`` first, then the lowest free ones. Positions are renumbered, so only the count
    and the values matter to the LLM."""
    taken = torch.isin(index, sources.to(index.device))
    free = torch.nonzero(~taken).flatten()[: max(0, k - int(taken.sum()))]
    return torch.sort(torch.cat([torch.nonzero(taken).flatten(), free])).values
