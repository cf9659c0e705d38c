"""VFlowOpt (ICCV 2025, "Token Pruning via Visual Information Flow Optimization"), spec §1.4-1.9 (official code
for LLaVA-OneVision; the paper body was not accessible, so the code is the reference).

Importance map, per crop, from the attention map of one vision layer (default: the layer the model reads):
drop the CLS row and column, renormalise every row over the N patches, average the heads -> A [N, N];
r_j = column mean; global tokens G = {j : r_j > threshold * mean(r)}; c_j = mean_{g in G} A[g, j] (c = r when G
is empty: the official code has no guard and gives NaN); s = c + entropy_weight * softmax(entropy) with the patch
entropy taken on de-normalised 0..255 pixels (the official code casts normalised pixels to uint8, which wraps).
Pooled tokens (InternVL's 2x2 pixel shuffle) sum their patches' s; LLaVA-NeXT tiles the crops like the features
and its newline tokens score 1.0 (spec §1.6).

Stage 0, the LLM input (positions renumbered): drop the round(N (1 - retention)) + floor(N / cell^2) lowest
scores; group the dropped tokens by spatial cell (grid, row // cell, col // cell) of the image's token grid
(LLaVA-NeXT's canvas rows include the newline column, as the code); each non-empty cell puts the score-weighted
mean of its members at its best-scoring member, which joins the kept set (``recycle=False``: no recycling,
the official non-anyres path). Stages 1 and 2, before ``llm_layers`` (original positions kept there): drop
round(n (1 - r_i)) of the current lowest scores of the same map (recycled tokens keep their member's score).

Budget (spec §1.9): ``keep=`` / ``ratio=`` are the *average* visual tokens over all L LLM layers (``keep``: per
standard image, anyres images scaled; ``ratio``: 1 - the average fraction kept). Given retention and r1, the
last stage keeps n2 = round((L target - k1 n0 - (k2 - k1) n1) / (L - k2)) of the realised counts n0, n1 (the
spec's r2 solved from the budget), so ``stats.equivalent_tokens`` equals the request within one token; when n2
would exceed n1 (r2 > 1) or drop below 1 it is clipped and the stage's stats carry a note; prune() warns when a
standard image cannot reach the budget whatever stage 0 recycles. No
budget: ``retention`` and ``llm_ratios=(r1, r2)`` alone (defaults: the released 25 % setting).
Defaults, tuned by the authors for LLaVA-OV-7B only: ``threshold``, ``cell``, ``retention`` and r1 are the
released 10 / 25 / 50 % settings interpolated linearly in the budget (anchored at no pruning for 100 %); the
cell size is in tokens of a 27-token grid and is scaled to this model's grid side. ``llm_layers`` maps the
released (9, 18) of 28 layers by relative depth (32 layers: 10, 21).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..budget import tokens_to_keep
from ..core.probes import PatchEntropy, VisionAttentionMap
from ..errors import PruneError
from ..core.registration import register
from ..space import Choice, Float, Seq, tuned
from .base import Cut, ImageView, Method, Selection, top_k_sorted

# released LLaVA-OV-7B settings by average budget: (budget, threshold t, cell a, retention rho_v, r1)
RELEASED = ((0.10, 39.265, 17.387, 0.11662, 1.0), (0.25, 34.760, 15.581, 0.26510, 0.98334),
            (0.50, 28.683, 11.757, 0.72332, 0.74875))
NO_BUDGET = (0.98334, 0.87733)  # the released 25 % (r1, r2)
REFERENCE_LAYERS, REFERENCE_DEPTH, REFERENCE_GRID = (9, 18), 28, 27
MIN_CELL, MAX_CELL, MAX_ENTROPY_WEIGHT = 0.01, 1e4, 1e3  # field bounds: see check_fields


def released_setting(budget: float) -> tuple[float, float, float, float]:
    """(threshold, cell, retention, r1) interpolated in the average budget, anchored at (.., 1, 1) for 100 %."""
    table = np.array([row for row in RELEASED] + [(1.0, RELEASED[-1][1], RELEASED[-1][2], 1.0, 1.0)])
    budget = float(np.clip(budget, 0.0, 1.0))
    t, a, rho, r1 = (float(np.interp(budget, table[:, 0], table[:, i])) for i in range(1, 5))
    if budget < RELEASED[0][0]:  # proportional below the smallest released budget
        rho = RELEASED[0][3] * budget / RELEASED[0][0]
    return t, a, rho, r1


def _released(part: str):
    """A search's trial 0 records, for a field left None, the value a standard image gets from the released
    setting at the budget (the cell scaled to the model's grid)."""

    def value(method, model) -> float | tuple[float, ...]:
        n, budgeted = model.nominal_tokens, (method.keep, method.ratio) != (None, None)
        fraction = (method.keep / n if method.keep is not None else 1.0 - method.ratio) if budgeted else None
        t, a, rho, r1 = method.setting(fraction, int(round(math.sqrt(n))))
        return {"threshold": t, "cell": a, "retention": rho, "llm_ratios": (r1,) if budgeted else NO_BUDGET}[part]

    return value


def _max_retention(method, model) -> float:
    """Above this stage-0 retention no schedule averages the budget (stages 1-2 keep >= 0 tokens); the search
    box is [1/5, 1] of it."""
    if (method.keep, method.ratio) == (None, None):
        return 1.0
    fraction = method.keep / model.nominal_tokens if method.keep is not None else 1.0 - method.ratio
    return min(1.0, fraction * model.llm_layers / method.stage_layers(model)[0])


def _grid(share: float):
    return lambda _, model: share * math.sqrt(model.nominal_tokens)  # the code's box [3, 24] of a 27-token grid


@register
@dataclass
class VFlowOpt(Method):
    vision_layer: int | None = None
    threshold: float | None = tuned(None, Float(0.0, 50.0, derive=_released("threshold")))  # search: the code's box
    cell: float | None = tuned(None, Float(_grid(3 / 27), _grid(24 / 27), when={"recycle": True},
                                           derive=_released("cell")))
    entropy_weight: float = tuned(0.0, Float(-1.0, 1.0))
    retention: float | None = tuned(None, Float(lambda m, model: _max_retention(m, model) / 5, _max_retention,
                                                derive=_released("retention")))
    llm_layers: tuple[int, int] | None = None
    llm_ratios: tuple[float, ...] | None = tuned(None, Seq(Float(0.2, 1.0), derive=_released("llm_ratios"),  # (r1,)
                                                           n=lambda m, _: 2 if (m.keep, m.ratio) == (None, None) else 1))
    recycle: bool = tuned(True, Choice((True, False)))
    positions: str = "renumber"

    name: ClassVar[str] = "vflowopt"
    description: ClassVar[str] = "Vision-attention importance map, recycled cells, progressive drops in the LLM."
    budget_optional: ClassVar[bool] = True
    budget_kind: ClassVar[str] = "average"

    def check_fields(self) -> None:
        if self.retention is not None and not 0.0 < self.retention <= 1.0:
            raise self.field_error("retention", "a fraction in (0, 1] kept at the LLM input")
        # Every cell <= 1 token holds one token (all act as 1) and every cell wider than the grid holds the whole
        # grid; past the bounds N / cell^2 divides by zero (1e-200 squared is 0) or cell^2 overflows (1e300).
        if self.cell is not None and not MIN_CELL <= self.cell <= MAX_CELL:
            raise self.field_error("cell", f"a cell size in [{MIN_CELL:g}, {MAX_CELL:g}] (tokens per side of a "
                                           "recycling cell; the released box is [3, 24] of a 27-token grid)")
        # The prior softmax(entropy) and the map c are both in [0, 1]: at 1e3 the map only breaks near-ties, and
        # cell sums of the scores stay far inside float32 (1e39 is inf and the recycled rows turn NaN).
        if not abs(self.entropy_weight) <= MAX_ENTROPY_WEIGHT:
            raise self.field_error("entropy_weight", f"a weight in [-{MAX_ENTROPY_WEIGHT:g}, {MAX_ENTROPY_WEIGHT:g}] "
                                                     "of the entropy prior (released: 0, search box [-1, 1])")
        if self.threshold is not None and self.threshold < 0.0:
            raise self.field_error("threshold", "a number >= 0 (global tokens: r_j > threshold * mean(r))")
        if self.llm_layers is not None and not 1 <= self.llm_layers[0] < self.llm_layers[1]:
            raise self.field_error("llm_layers", "two increasing LLM layers >= 1")
        budgeted = self.ratio is not None or self.keep is not None
        wanted = 1 if budgeted else 2
        if self.llm_ratios is not None and (len(self.llm_ratios) != wanted or any(not 0 < r <= 1 for r in self.llm_ratios)):
            expected = "(r1,) in (0, 1]: r2 is solved from the budget" if budgeted else "(r1, r2), each in (0, 1]"
            raise self.field_error("llm_ratios", expected)

    # --- schedule -------------------------------------------------------------------------------------
    def target(self, image: ImageView) -> float | None:
        """Average visual tokens per LLM layer requested for this image, or None without a budget."""
        if self.ratio is not None:
            return image.n_received * (1.0 - self.ratio)
        if self.keep is not None:
            return float(tokens_to_keep(image.n_tokens, None, self.keep, image.nominal, self.name))
        return None

    def setting(self, fraction: float | None, grid_side: int) -> tuple[float, float, float, float]:
        """(threshold, cell in this grid's tokens, retention, r1): the fields, else the released setting."""
        t, a, rho, r1 = released_setting(0.25 if fraction is None else fraction)
        if self.cell is None:
            a = a * grid_side / REFERENCE_GRID
        r1 = self.llm_ratios[0] if self.llm_ratios else (NO_BUDGET[0] if fraction is None else r1)
        return (t if self.threshold is None else self.threshold, a if self.cell is None else self.cell,
                rho if self.retention is None else self.retention, r1)

    def stage_layers(self, model) -> tuple[int, int]:
        if self.llm_layers is not None:
            return self.llm_layers
        k1, k2 = (int(k * model.llm_layers / REFERENCE_DEPTH + 0.5) for k in REFERENCE_LAYERS)
        k1 = max(1, k1)
        k2 = min(max(k2, k1 + 1), model.llm_layers - 1)
        if k2 <= k1:
            raise PruneError("vtprune: vflowopt needs at least 3 LLM layers for its two LLM stages; set llm_layers=")
        return k1, k2

    def cuts(self, model):
        return (Cut("pre_llm"),) + tuple(Cut("llm", k) for k in self.stage_layers(model))

    def probes(self, model):
        layer = model.feature_layer if self.vision_layer is None else self.vision_layer
        attention = (VisionAttentionMap((layer,), per_head=True),)
        return attention + ((PatchEntropy(),) if self.entropy_weight else ())

    def positions_at(self, cut: Cut) -> str:
        return self.positions if cut.where == "pre_llm" else "original"

    def setup(self, model) -> None:
        """Warn at prune() when a standard image cannot reach the budget whatever stage 0 recycles: of the P =
        dropped + floor(N / cell^2) pruned tokens, between 1 and min(P, cells of the grid) come back; stage 2 keeps
        between 1 and n1."""
        if self.ratio is None and self.keep is None:
            return
        N = model.nominal_tokens
        target = N * (1.0 - self.ratio) if self.ratio is not None else float(self.keep)
        _, cell, rho, r1 = self.setting(target / N, int(round(math.sqrt(N))))
        (k1, k2), L = self.stage_layers(model), model.llm_layers
        side, dropped = int(round(math.sqrt(N))), int(round(N * (1 - rho)))
        if self.recycle:
            pruned = min(N - 1, dropped + int(math.floor(N / cell**2)))
            n0_min, n0_max = N - pruned + 1, N - pruned + min(pruned, math.ceil(side / cell) ** 2)
        else:
            n0_min = n0_max = N - dropped

        def average(n0: int, last: int | None) -> float:
            n1 = n0 - int(round(n0 * (1 - r1)))
            return (k1 * n0 + (k2 - k1) * n1 + (L - k2) * (n1 if last is None else last)) / L

        reach = (average(max(1, n0_min), 1), average(n0_max, None))
        if not reach[0] - 1 <= target <= reach[1] + 1:
            warnings.warn(
                f"vtprune: vflowopt cannot average {target:g} visual tokens over the LLM layers of a {N}-token image "
                f"with retention {rho:.3f} and r1 {r1:.3f} (reachable: {reach[0]:.1f}..{reach[1]:.1f}); the last "
                "stage is clipped and the average misses (change retention or llm_ratios)", UserWarning, stacklevel=2)

    # --- decisions ------------------------------------------------------------------------------------------
    def select_batch(self, images: list[ImageView]) -> list[Selection]:
        return [self.first_stage(v) if v.stage == "pre_llm" else self.llm_stage(v) for v in images]

    def importance(self, image: ImageView) -> torch.Tensor:
        """[N] importance of every token of the image (spec §1.5-1.6)."""
        model = image.model
        layer = model.feature_layer if self.vision_layer is None else self.vision_layer
        probs = image[VisionAttentionMap((layer,), per_head=True)][layer].float()  # [crops, H, S, S]
        patches = probs[:, :, 1:, 1:]
        A = (patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)).mean(1)  # [crops, P, P]
        threshold, _, _, _ = self.setting(self.fraction(image), self.grid_side(image))
        r = A.mean(1)  # [crops, P] column means
        is_global = r > threshold * r.mean(-1, keepdim=True)
        weights = is_global.float() / is_global.sum(-1, keepdim=True).clamp(min=1)
        c = torch.where(is_global.any(-1, keepdim=True), (weights[:, :, None] * A).sum(1), r)
        if self.entropy_weight:
            c = c + self.entropy_weight * image[PatchEntropy()].softmax(-1)
        score, has_patches = image.from_patches(c)
        return torch.where(has_patches, score, torch.ones_like(score))  # newline tokens: 1.0

    def fraction(self, image: ImageView) -> float | None:
        target = self.target(image)
        return None if target is None else target / image.n_received

    def grid_side(self, image: ImageView) -> int:
        return int(round(math.sqrt(image.nominal)))

    def first_stage(self, image: ImageView) -> Selection:
        """Stage 0: keep the best, recycle the dropped ones cell by cell (spec §1.7)."""
        s = self.importance(image)[image.index]
        image.state["score"] = torch.zeros(image.n_tokens, device=s.device).index_copy_(0, image.index, s)
        _, cell, retention, _ = self.setting(self.fraction(image), self.grid_side(image))
        n = image.n
        n_drop = int(round(n * (1 - retention)))
        if not self.recycle:
            return Selection(keep=top_k_sorted(s, max(1, n - n_drop)))
        n_pruned = min(n - 1, n_drop + int(math.floor(n / cell**2)))
        pruned = torch.sort(s, stable=True).indices[:n_pruned]
        grid = image.token_grid()[image.index.cpu()][pruned.cpu()]
        cells = torch.stack([grid[:, 0], (grid[:, 1] / cell).floor().long(), (grid[:, 2] / cell).floor().long()], 1)
        _, group = torch.unique(cells, dim=0, return_inverse=True)
        kept = torch.ones(n, dtype=torch.bool, device=s.device)
        kept[pruned] = False
        merged = {}
        for g in range(int(group.max()) + 1 if group.numel() else 0):
            members = pruned[(group == g).to(pruned.device)]
            w = s[members] / s[members].sum() if float(s[members].sum()) > 0 else torch.full_like(s[members], 1 / members.numel())
            rep = members[torch.argmax(s[members])]
            merged[int(rep)] = (w[:, None] * image.embeds[members].float()).sum(0)
            kept[rep] = True
        keep = torch.nonzero(kept).flatten()
        values = image.embeds[keep].clone()
        for i, slot in enumerate(keep.tolist()):
            if slot in merged:
                values[i] = merged[slot].to(values.dtype)
        image.state["n0"] = int(keep.numel())
        return Selection(keep=keep, values=values)

    def llm_stage(self, image: ImageView) -> Selection:
        """Stages 1 and 2: drop the lowest scores of the same map (spec §1.8); stage 2 meets the budget."""
        k1, k2 = self.stage_layers(image.model)
        n, L = image.n, image.model.llm_layers
        _, _, _, r1 = self.setting(self.fraction(image), self.grid_side(image))
        note = None
        if image.layer == k1:
            n_keep = n - int(round(n * (1 - r1)))
            image.state["n1"] = n_keep
        elif self.target(image) is None:
            n_keep = n - int(round(n * (1 - (self.llm_ratios or NO_BUDGET)[1])))
        else:
            n0, n1 = image.state.get("n0", image.n_received), image.state.get("n1", n)
            needed = int(round((L * self.target(image) - k1 * n0 - (k2 - k1) * n1) / (L - k2)))
            n_keep = min(max(needed, 1), n)
            if needed > n:
                note = f"budget short: stage 2 needs {needed} tokens but {n} are left (r2 clipped at 1)"
            elif needed < 1:
                note = f"budget over: stage 2 would keep {needed} tokens; it keeps 1 (lower retention or llm_ratios)"
        score = image.state["score"][image.index]
        return Selection(keep=top_k_sorted(score, n_keep), note=note)
