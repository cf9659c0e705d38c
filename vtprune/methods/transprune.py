"""TransPrune (Liao et al., CVPR 2026, "Token Transition Pruning"), spec §3.2. Official code authoritative.

Inside the LLM, progressive cuts before the 0-based layers ``layers`` (the paper's 1-based 7, 9, 12 are cut
*after*, i.e. before 0-based 7, 9, 12). For every accumulation layer l (0-based ``layers[0] - 1`` through
``layers[-1] - 1``) and each sublayer (attention, FFN) with input x (its RMSNorm output) and output o (before
the residual add), per position j of a sample:
    TTV = ||o_j|| / ||x_j|| * softmax_j(delta),   delta_j = 1 - cos(x_j, o_j)   (code; paper Eq. 2: 1 - |cos|)
the softmax running over the sample's valid positions, text included (``softmax_over_batch=True``: over the
whole batch, as the official code's dimensionless sum, for parity at batch > 1). TTV_l = TTV_att + TTV_ffn.
At the cut before layer K = layers[i]:
    TTV_acc = sum of TTV_l over the accumulation layers l < K, on the image's current tokens, / (sum + 1e-8)
    IGA     = layer K's own attention (its input norm, q/k, RoPE at the current positions, causal mask) of the
              instruction tokens (every prompt token after the sample's last image) to the image's tokens,
              computed on the hidden states entering K; head mean, then instruction mean, / (sum + 1e-8)
    score   = alpha * TTV_acc + (1 - alpha) * IGA;  keep the top int(N * keep_ratios[i]) in original order
N is the image's token count when TransPrune received it (after an earlier method of a pipeline, as the
paper's VisionZip + TransPrune rows). Positions are renumbered after each cut (spec step 4; decode positions
shift accordingly). Budget: optional. With ``keep=`` / ``ratio=`` the final stage keeps that budget and each
earlier stage max(its int(N * ratio), that budget); without, ``keep_ratios`` alone define the schedule (the
paper's "High": 576 -> 504 -> 360 -> 72). At least one token is always kept.

Other depths: ``layers=None`` maps the 32-layer defaults (7, 9, 12) by relative depth, round(k * L / 32),
strictly increasing (28 layers: 6, 8, 11; a 4-layer test LLM: 1, 2, 3).
Where we differ from the code: masks are rebuilt for the shorter sequence, so padding, batches and several
images work (the code handles one image, batch 1, right padding); TTV is computed at prefill only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..budget import tokens_to_keep
from ..core.probes import IncomingAttention, Sublayer, SublayerBatch
from ..errors import PruneError
from ..core.registration import register
from ..space import Choice, Float, Int, Seq, tuned
from .base import Cut, ImageView, Method, Selection, top_k_sorted

DEFAULT_LAYERS, DEFAULT_DEPTH = (7, 9, 12), 32  # 0-based cut layers of the 32-layer Vicuna-7B
DIRECTIONS = ("code", "paper")


@register
@dataclass
class TransPrune(Method):
    layers: tuple[int, ...] | None = tuned(None, Seq(Int(1, lambda _, model: model.llm_layers - 1),
                                                     n=lambda m, _: len(m.keep_ratios), order="increasing",
                                                     derive=lambda m, model: m.cut_layers(model)))
    keep_ratios: tuple[float, ...] = tuned((0.875, 0.625, 0.125), Seq(Float(0.05, 1.0), n=3, order="decreasing"))
    alpha: float = tuned(0.5, Float(0.0, 1.0))
    direction: str = tuned("code", Choice(DIRECTIONS))
    softmax_over_batch: bool = False
    positions: str = "renumber"

    name: ClassVar[str] = "transprune"
    description: ClassVar[str] = "Token-transition (sublayer magnitude x direction) + instruction attention, progressive in the LLM."
    budget_optional: ClassVar[bool] = True

    def check_fields(self) -> None:
        if not self.keep_ratios or any(not 0.0 < r <= 1.0 for r in self.keep_ratios):
            raise self.field_error("keep_ratios", "fractions in (0, 1] of the image's tokens kept after each cut")
        if list(self.keep_ratios) != sorted(self.keep_ratios, reverse=True):
            raise self.field_error("keep_ratios", "non-increasing fractions (each cut keeps no more than the last)")
        if self.layers is not None and (len(self.layers) != len(self.keep_ratios) or self.layers[0] < 1
                                        or list(self.layers) != sorted(set(self.layers))):
            raise self.field_error("layers", f"{len(self.keep_ratios)} strictly increasing LLM layers >= 1, one per keep ratio")
        if not 0.0 <= self.alpha <= 1.0:
            raise self.field_error("alpha", "a number in [0, 1] (weight of the token transition score)")
        if self.direction not in DIRECTIONS:
            raise self.field_error("direction", "'code' (1 - cos, official code) or 'paper' (1 - |cos|, Eq. 2)")

    def cut_layers(self, model) -> tuple[int, ...]:
        if self.layers is not None:
            return self.layers
        if len(self.keep_ratios) != len(DEFAULT_LAYERS):
            raise PruneError(f"vtprune: transprune with {len(self.keep_ratios)} keep_ratios needs layers=")
        mapped: list[int] = []
        for k in DEFAULT_LAYERS:
            mapped.append(max(int(k * model.llm_layers / DEFAULT_DEPTH + 0.5), mapped[-1] + 1 if mapped else 1))
        if mapped[-1] >= model.llm_layers:
            raise PruneError(f"vtprune: transprune needs at least 4 LLM layers for its default schedule; set layers=")
        return tuple(mapped)

    def accumulation_layers(self, model) -> range:
        layers = self.cut_layers(model)
        return range(layers[0] - 1, layers[-1])

    def cuts(self, model):
        return tuple(Cut("llm", k) for k in self.cut_layers(model))

    def probes(self, model):
        sublayers = tuple(Sublayer(l, part) for l in self.accumulation_layers(model) for part in ("attn", "mlp"))
        return sublayers + tuple(IncomingAttention(k, "instruction") for k in self.cut_layers(model))

    def count(self, image: ImageView) -> int:
        """Tokens kept at this cut: int(N * keep_ratio), or the budget at the last cut (and at least it before)."""
        stage = self.cut_layers(image.model).index(image.layer)
        n = max(1, int(image.n_received * self.keep_ratios[stage]))
        if self.ratio is not None or self.keep is not None:
            final = (tokens_to_keep(image.n_received, self.ratio, None) if self.ratio is not None
                     else tokens_to_keep(image.n_tokens, None, self.keep, image.nominal, self.name))
            n = final if stage == len(self.keep_ratios) - 1 else max(n, final)
        return min(n, image.n)

    def select_batch(self, images: list[ImageView]) -> list[Selection]:
        if not images:
            return []
        first, layer = images[0], images[0].layer
        accumulated = [l for l in self.accumulation_layers(first.model) if l < layer]
        ttv = first.shared.setdefault("ttv", {})  # [B, T_l] per layer, computed once per forward
        for l in accumulated:
            if l not in ttv:
                ttv[l] = self.transition(first.batch(Sublayer(l, "attn"))) + self.transition(first.batch(Sublayer(l, "mlp")))
        out = []
        for image in images:
            acc = sum(ttv[l][image.sample, image[Sublayer(l, "attn")].slots] for l in accumulated)
            iga = image[IncomingAttention(layer, "instruction")].float()  # [H, q, n]
            iga = iga.mean(0).mean(0) if iga.shape[1] else torch.zeros(image.n, device=iga.device)
            score = self.alpha * acc / (acc.sum() + 1e-8) + (1 - self.alpha) * iga / (iga.sum() + 1e-8)
            out.append(Selection(keep=top_k_sorted(score, self.count(image))))
        return out

    def transition(self, rows: SublayerBatch) -> torch.Tensor:
        """[B, T] TTV of one sublayer: magnitude ratio x softmax of the direction change over valid positions."""
        x, o = rows.input.float(), rows.output.float()
        magnitude = o.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)
        cos = F.cosine_similarity(x, o, dim=-1)
        delta = (1 - cos if self.direction == "code" else 1 - cos.abs()).masked_fill(~rows.valid, float("-inf"))
        if self.softmax_over_batch:
            weight = delta.flatten().softmax(0).view_as(delta)
        else:
            weight = delta.softmax(-1)
        return magnitude * weight
