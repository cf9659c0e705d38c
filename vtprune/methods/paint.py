"""PAINT ("Fixing Imbalanced Attention to Mitigate In-Context Hallucination of LVLMs", arXiv 2501.12206),
spec §2.3-2.4; official code (``modPAI``) authoritative.

Token sets per image, from the vision tower's CLS attention (head mean, summed over each token's patches):
local = the top floor(N ``local_ratio``) tokens by layer ``local_layer``'s (0); summary = the top floor(N f) by the
feature layer's, f = the share of tokens above Q3 + 1.5 IQR there; optional spatial = the top
floor(N ``spatial_ratio``) by the attention layer 0's patch queries pay each patch (column sum of the head-mean
map: the faithful intent; the released function sums rows and is never called); local <- (local | spatial) \\
summary. In LLM layers ``start``..L-1 (default 2..L-1), every head, on the **last query row only** (the last
prompt token at the prefill, the new token at each decode step): z[local] += alpha |z[local]|, z[summary] +=
beta |z[summary]| before the softmax, through the model's own attention (the other rows are the plain call's).
The sets follow the kept tokens after any pruning cut (columns = the kept tokens of each set in that layer).
Where we differ: the v1 abstract's per-head visual sensitivity has no code counterpart (same alpha / beta for
every head, as the released code); PAI's classifier-free-guidance decoding wrapper (gamma 1.1) is not included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.probes import VisionAttentionMap, VisionCLS
from ..core.registration import register
from ..space import Float, Int, tuned
from .base import Method

MAX_BOOST = 100.0  # alpha / beta: see check_fields

@register
@dataclass
class PAINT(Method):
    alpha: float = tuned(0.7, Float(0.0, 2.0))
    beta: float = tuned(0.4, Float(0.0, 2.0))
    local_ratio: float = tuned(0.25, Float(0.0, 0.5))
    spatial_ratio: float = 0.0
    local_layer: int = 0
    start: int = tuned(2, Int(0, lambda _, model: min(model.llm_layers - 1, max(2, model.llm_layers // 2))))

    name: ClassVar[str] = "paint"
    description: ClassVar[str] = "Boosts the last query row's logits of locally informative and summary visual tokens."
    has_budget: ClassVar[bool] = False
    prunes: ClassVar[bool] = False

    def check_fields(self) -> None:
        for name in ("alpha", "beta"):
            # A boost multiplies a logit's magnitude by up to 1 + alpha: at 100 a token with |z| = 1 already gains
            # e^100 in the softmax, so more changes nothing but overflow: alpha |z| is a float32 bias (1e39 is inf,
            # 1e38 gives NaN logits) cast to the model's dtype (fp16 holds it for |z| < 655 at 100).
            if not 0.0 <= getattr(self, name) <= MAX_BOOST:
                raise self.field_error(name, f"a boost factor in [0, {MAX_BOOST:g}] (paper: alpha 0.7, beta 0.4)")
        for name in ("local_ratio", "spatial_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise self.field_error(name, "a fraction in [0, 1] of the image's tokens")
        if self.start < 0:
            raise self.field_error("start", "an LLM layer >= 0 (the first one modulated)")

    def cuts(self, model):
        return ()

    def modulated_layers(self, model):
        return tuple(range(self.start, model.llm_layers))

    def probes(self, model):
        cls = (VisionCLS(tuple(sorted({self.local_layer, model.feature_layer}))),)
        return cls + ((VisionAttentionMap((self.local_layer,)),) if self.spatial_ratio else ())

    def token_sets(self, call, span) -> tuple[torch.Tensor, torch.Tensor]:
        """(local, summary) original token indices of one image (spec §2.3), computed once per prefill."""
        sets = call.shared.setdefault("sets", {})
        if span.image not in sets:
            layers = tuple(sorted({self.local_layer, self._feature}))
            rows = call.image(VisionCLS(layers), span)  # {layer: [N]}
            early, late = rows[self.local_layer].float(), rows[self._feature].float()
            n = early.numel()
            local = set(torch.topk(early, int(n * self.local_ratio)).indices.tolist())
            q1, q3 = torch.quantile(late, torch.tensor([0.25, 0.75], device=late.device))
            outliers = int((late > q3 + 1.5 * (q3 - q1)).sum())
            summary = set(torch.topk(late, outliers).indices.tolist()) if outliers else set()
            if self.spatial_ratio:
                local |= set(self.spatial(call, span, int(n * self.spatial_ratio)))
            local -= summary
            sets[span.image] = (torch.tensor(sorted(local), dtype=torch.long), torch.tensor(sorted(summary), dtype=torch.long))
        return sets[span.image]

    def spatial(self, call, span, k: int) -> list[int]:
        """The k tokens whose patches receive the most head-mean attention from layer ``local_layer``'s patches."""
        maps = call.image(VisionAttentionMap((self.local_layer,)), span)[self.local_layer].float()  # [crops, S, S]
        received = maps[:, 1:, 1:].sum(1)  # column sums over patch queries, CLS excluded: [crops, P]
        per_token, _ = call.geometry(span).from_patches(received)
        return torch.topk(per_token, k).indices.tolist()

    def setup(self, model) -> None:
        self._feature = model.feature_layer

    def modulate(self, call):
        if call.visual is None:
            return None
        z = call.logits(slice(-1, None))  # [B, H, 1, T], masked keys at -inf
        gain = torch.zeros(z.shape[0], z.shape[-1], device=z.device)
        for span in call.spans:
            local, summary = self.token_sets(call, span)
            slots, index = call.image_slots(span)
            for members, weight in ((local, self.alpha), (summary, self.beta)):
                gain[span.sample, slots[torch.isin(index, members.to(index.device))]] = weight
        if not bool(gain.any()):
            return None
        last = z.new_zeros(z.shape[0], z.shape[1], call.query.shape[2], z.shape[-1])
        last[:, :, -1:] = gain[:, None, None, :] * z.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0)
        rows = torch.zeros(1, 1, call.query.shape[2], dtype=torch.bool, device=z.device)
        rows[..., -1] = True
        return call.run_rows(rows, bias=last)  # eager: the boosted probabilities on the last row
