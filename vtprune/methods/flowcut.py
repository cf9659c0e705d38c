"""FlowCut (Tong et al., 2025, "Rethinking Redundancy via Information Flow"), spec §1. The official code is
authoritative where it and the paper differ; the paper variants are options.

Vision encoder, every layer l < s (s = the layer the model reads features from), on the current n patches:
    a   = head-mean CLS attention row over the patches;            a_n = a / sum(a)
    sem = head-mean softmax_{all n+1 tokens}(v_CLS . v_j) without CLS, renormalised       (code: no 1/sqrt(d))
    den = L1 norm of the head-mean value vector
    S   = (a_n + sem) * den;   S_cum = S at the first layer, then 0.5 S_cum + 0.5 S
Every two layers (where r = s - l - 1 is even) the output of layer l is pruned by
    P = round((N - T) / sqrt(r) * (1 - rho^2)),  rho = entropy(a / sum a) / ln N,   P = N when r = 0,
keeping the top max(N - P, T) patches by S_cum in raster order (CLS always stays). With a batch the official
code uses the batch-max P for every crop (``shared_prune_count=True``, the default).

Anyres (several crops per image, LLaVA-NeXT): each crop keeps floor(``vit_share`` x N) patches in the ViT, N
being the image's budget (official: N/2 per crop, i.e. 2.5 N in all for a 2x2 grid's 5 crops; N is estimated
as the per-crop budget times the crop count, since the ViT runs before the prompt is seen), then before LLM layer ``llm_layer``
(after layer index 1) every image is cut to its budget by the last prompt token's post-RoPE query and value:
    score = (mean_h softmax_vis(q_last K^T / sqrt d) + mean_h softmax_vis(v_last V^T / sqrt d)) * L1(mean_h V)
Positions are renumbered contiguously (as the official code). Pooled models (InternVL's 2x2 pixel shuffle)
prune whole 2x2 groups: a group's score, attention and count are those of its patches summed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budget import tokens_to_keep
from ..core.registration import register
from ..space import Choice, Float, Int, tuned
from ..core.probes import LLMQKV, VisionCLS, VisionValues
from .base import Cut, ImageView, Method, Selection, top_k_sorted


def flowcut_prune_count(attention: torch.Tensor, n_target: int, remaining: int) -> int:
    """Patches to remove at one step (spec §1.2 step 4). ``attention``: [N] CLS attention over the current
    units; ``remaining``: r, the layers left before the feature layer (0 forces the cut to ``n_target``)."""
    n = attention.numel()
    if remaining <= 0:
        return n - n_target
    p = attention.double() / attention.double().sum()
    entropy = float(-(p * torch.log(p + 1e-7)).sum())  # epsilon: the official LLaVA path NaNs on zeros
    rho = entropy / math.log(n) if n > 1 else 0.0
    return max(0, int(round((n - n_target) / math.sqrt(remaining) * (1.0 - rho**2))))


@register
@dataclass
class FlowCut(Method):
    cumulative_weight: float = tuned(0.5, Float(0.0, 1.0))
    semantic_scaling: str = tuned("none", Choice(("none", "sqrt_d")))  # "none" (official code) or "sqrt_d" (paper)
    shared_prune_count: bool = True
    vit_share: float = tuned(0.5, Float(0.25, 1.0, only_for=("llava_next",)))  # anyres crops only
    llm_layer: int = tuned(2, Int(1, lambda _, model: min(model.llm_layers - 1, max(3, model.llm_layers // 4)),
                                  only_for=("llava_next",)))
    positions: str = "renumber"

    name: ClassVar[str] = "flowcut"
    description: ClassVar[str] = "Information-flow scores (CLS attention, value relevance, density) pruned progressively in the ViT."

    def check_fields(self) -> None:
        if self.semantic_scaling not in ("none", "sqrt_d"):
            raise self.field_error("semantic_scaling", "'none' (official code) or 'sqrt_d' (paper pseudocode)")
        if not 0.0 <= self.cumulative_weight <= 1.0:
            raise self.field_error("cumulative_weight", "a number in [0, 1] (weight of the running score)")
        if not 0.0 < self.vit_share <= 1.0:
            raise self.field_error("vit_share", "a number in (0, 1] (share of the image budget each anyres crop keeps)")
        if self.llm_layer < 1:
            raise self.field_error("llm_layer", "an LLM layer >= 1 (scores at llm_layer - 1, cuts before it)")

    # --- schedule -----------------------------------------------------------------------------------------
    def cuts(self, model):
        # prune the output of layer l when r = s - l - 1 is even  ->  cut before layer l + 1 = s - r
        s = model.feature_layer
        return tuple(Cut("vision", s - r) for r in sorted(range(0, s, 2), reverse=True)) + (Cut("llm", self.llm_layer),)

    def probes(self, model):
        observed = tuple(range(model.feature_layer))
        return VisionCLS(observed), VisionValues(observed), LLMQKV(self.llm_layer - 1)

    # --- vision stage ---------------------------------------------------------------------------------------
    def _layer_score(self, cls_row: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cls_row [H, n+1], values [H, n+1, d] -> (S [n], a [n]) for the n current patches."""
        a = cls_row[:, 1:].float().mean(0)
        a_n = a / a.sum().clamp_min(1e-12)
        v = values.float()
        logits = (v[:, :1] @ v.transpose(-1, -2))[:, 0]  # [H, n+1]
        if self.semantic_scaling == "sqrt_d":
            logits = logits / math.sqrt(v.shape[-1])
        sem = logits.softmax(-1).mean(0)[1:]
        sem = sem / sem.sum().clamp_min(1e-12)
        density = v.mean(0)[1:].abs().sum(-1)
        return (a_n + sem) * density, a

    def _crop_target(self, view: ImageView) -> int:
        """Units (patches, or pooled groups) a crop keeps at the end of the ViT."""
        n_units = view.n_tokens // view.patches_per_unit
        target = tokens_to_keep(n_units, self.ratio, self.keep, n_units, self.name)
        if view.crops_in_image > 1:  # anyres: floor(N/2) per crop in the ViT (N = the image's budget), then the LLM cut
            target = int(math.floor(target * view.crops_in_image * self.vit_share))
        return max(1, min(n_units, target))

    def select_batch(self, views: list[ImageView]) -> list[Selection]:
        if not views or views[0].stage != "vision":
            return super().select_batch(views)
        cls_probe, values_probe, _ = self.probes(views[0].model)
        plans = []
        for v in views:
            st, cls_rows, values = v.state, v[cls_probe], v[values_probe]
            for layer in sorted(cls_rows):
                score, a = self._layer_score(cls_rows[layer], values[layer])
                w = float(self.cumulative_weight)
                st["score"] = score if "score" not in st else w * st["score"] + (1 - w) * score
                st["attention"] = a
            target_units = self._crop_target(v)
            unit_ids, inverse = torch.unique(v.units, return_inverse=True)
            unit_score = torch.zeros(unit_ids.numel(), dtype=torch.float64).index_add_(0, inverse, st["score"].double())
            unit_attn = torch.zeros(unit_ids.numel(), dtype=torch.float64).index_add_(0, inverse, st["attention"].double())
            remaining = v.model.feature_layer - v.layer  # r of the layer whose output is cut
            prune = flowcut_prune_count(unit_attn, target_units, remaining)
            plans.append((v, unit_score, inverse, target_units, prune))
        if self.shared_prune_count:
            shared = max(p[4] for p in plans)
            plans = [(v, us, inv, t, shared) for v, us, inv, t, _ in plans]
        out = []
        for v, unit_score, inverse, target_units, prune in plans:
            n_keep_units = max(unit_score.numel() - prune, target_units)
            kept_units = top_k_sorted(unit_score, n_keep_units)
            unit_mask = torch.zeros(unit_score.numel(), dtype=torch.bool)
            unit_mask[kept_units] = True
            keep = torch.nonzero(unit_mask[inverse]).flatten()
            v.state["score"] = v.state["score"][keep]
            v.state["attention"] = v.state["attention"][keep]
            out.append(Selection(keep=keep))
        return out

    # --- LLM stage (images still over budget, i.e. anyres) --------------------------------------------------
    def select(self, image: ImageView, n_keep: int) -> Selection:
        if image.stage != "llm" or image.n <= n_keep:
            return Selection(keep=torch.arange(image.n, device=image.embeds.device))
        qkv = image[LLMQKV(self.llm_layer - 1)]
        scale = qkv["scaling"]
        rel = (qkv["keys"] @ qkv["q_last"][..., None])[..., 0].mul(scale).softmax(-1).mean(0)  # [n]
        sem = (qkv["values"] @ qkv["v_last"][..., None])[..., 0].mul(scale).softmax(-1).mean(0)
        density = qkv["values"].mean(0).abs().sum(-1)
        score = (rel / rel.sum() + sem / sem.sum()) * density
        return Selection(keep=top_k_sorted(score, n_keep))
