"""DivPrune (Alvar et al., CVPR 2025, "Diversity-based Visual Token Pruning"), spec §3.

Algorithm (official ``LlavaMetaForCausalLM.DivPrune``, spec §3.2), on each image's projector outputs (the LLM
input rows of the image) before the LLM:
1. distance d(a, b) = 1 - cos(a, b);
2. first pick: the most isolated token, argmax_j of the distance to its nearest other token;
3. each next pick maximises its minimum distance to the picked set (max-min diversity, farthest point);
4. the kept tokens go to the LLM in original order with contiguous positions (``positions="renumber"``).

Where we differ from the code, on purpose: the official loop re-gathers every picked row per step (O(M^2 N));
:func:`max_min_greedy` keeps a running minimum (O(M N), same picks: :func:`max_min_greedy_quadratic` is the
official form, tested equal). Distances are fp32 (the code uses fp16, where a self-distance need not be 0);
the first pick excludes the diagonal instead of taking each column's second-smallest entry (the same token
whenever the self-distance is the column's minimum, i.e. always in exact arithmetic). A picked token is never
picked again (the code could re-pick one only when every remaining token is an exact duplicate). Ties go to the
lowest index (torch argmax). Up to ``SIM_BLOCK_ELEMENTS`` similarity entries (N <= 2048) the N x N similarity
is one matrix product and each pick reads a row of it (a matrix-vector product per pick re-reads all N x D
inputs: 4.6 % of a LLaVA-1.5-7B-wide prefill on CPU at keep 64 and 192); above it no N x N matrix is kept: the
nearest-neighbour pass runs over row blocks and each pick is a matrix-vector product (the same picks: tested).

Budget: ``keep`` / ``ratio`` as every method, or, with neither, the official ``SUBSET_RATIO`` = ``subset_ratio``
(fraction *kept*, 0.098: 56 of 576 on LLaVA-1.5) as ``round(subset_ratio * N)``. On LLaVA-NeXT one selection
runs over the image's whole packed token list, newline tokens included (official).
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core.registration import register
from .base import ImageView, Method, Selection

SUBSET_RATIO = 0.098  # official default (README, run_Divprune.sh)
SIM_BLOCK_ELEMENTS = 1 << 22  # similarity entries per block (16 MiB fp32): N <= 2048 is one block


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """[n, D] rows scaled to unit L2 norm, fp32 (fp64 stays fp64)."""
    return F.normalize(x if x.dtype == torch.float64 else x.float(), dim=-1)


def nearest_distance(xn: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """[n] 1 - max cosine of each unit row to any *other* row, computed over row blocks of the n x n similarity."""
    n = xn.shape[0]
    block = max(1, (SIM_BLOCK_ELEMENTS // max(n, 1)) if block is None else block)
    out = torch.empty(n, dtype=xn.dtype, device=xn.device)
    for lo in range(0, n, block):
        sim = xn[lo:lo + block] @ xn.T  # [b, n]
        rows = torch.arange(sim.shape[0], device=xn.device)
        sim[rows, rows + lo] = float("-inf")  # not one's own neighbour
        out[lo:lo + block] = 1.0 - sim.max(dim=1).values
    return out


def max_min_greedy(x: torch.Tensor, k: int, block: int | None = None) -> torch.Tensor:
    """[k] picks in order (most isolated first, then farthest from the picked set), O(k n D) time, O(n) state."""
    xn = unit_rows(x)
    n, k = xn.shape[0], max(0, min(int(k), xn.shape[0]))
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=xn.device)
    if block is None and n * n <= SIM_BLOCK_ELEMENTS:  # one matrix product; each pick then reads a row of it
        sim = xn @ xn.T
        # the diagonal is only read for a token once it is picked, and a picked token's score is -inf anyway
        nearest, row = 1.0 - sim.fill_diagonal_(float("-inf")).max(dim=1).values, sim.__getitem__
    else:  # no n x n matrix: a matrix-vector product per pick
        nearest, row = nearest_distance(xn, block), lambda j: xn @ xn[j]
    picks = [int(nearest.argmax())] if n > 1 else [0]
    score = 1.0 - row(picks[0])  # min distance to the picked set
    score[picks[0]] = float("-inf")
    for _ in range(1, k):
        j = int(score.argmax())
        picks.append(j)
        score = torch.minimum(score, 1.0 - row(j))
        score[j] = float("-inf")  # earlier picks stay -inf through the minimum
    return torch.tensor(picks, dtype=torch.long, device=xn.device)


def max_min_greedy_quadratic(x: torch.Tensor, k: int) -> torch.Tensor:
    """The official O(k^2 n) form (full distance matrix, re-gathering the picked rows each step), for parity."""
    xn = unit_rows(x)
    n, k = xn.shape[0], max(0, min(int(k), xn.shape[0]))
    dist = 1.0 - xn @ xn.T
    first = dist.clone()
    first.fill_diagonal_(float("inf"))
    picks = [int(first.min(dim=1).values.argmax())] if k else []
    for _ in range(1, k):
        score = dist[picks].min(dim=0).values
        score[picks] = float("-inf")  # the code's ~0 self-distance, made exact
        picks.append(int(score.argmax()))
    return torch.tensor(picks, dtype=torch.long, device=xn.device)


@register
@dataclass
class DivPrune(Method):
    """``subset_ratio``: the kept fraction used when neither ``ratio`` nor ``keep`` is given (official 0.098)."""

    subset_ratio: float = SUBSET_RATIO
    positions: str = "renumber"

    name: ClassVar[str] = "divprune"
    description: ClassVar[str] = "Max-min diversity (1 - cosine) greedy on projector outputs, cut before the LLM."
    budget_optional: ClassVar[bool] = True

    def check_fields(self) -> None:
        if not 0.0 < self.subset_ratio <= 1.0:
            raise self.field_error("subset_ratio", "a kept fraction in (0, 1] (official SUBSET_RATIO 0.098)")
        # the default, also as a float32 (a numpy scalar), is not a second budget
        if (self.ratio is not None or self.keep is not None) and not math.isclose(self.subset_ratio, SUBSET_RATIO,
                                                                                   rel_tol=1e-6):
            raise self.field_error("subset_ratio", "to be left out when ratio= or keep= gives the budget (one budget)")

    def budget(self, image: ImageView) -> int:
        if self.ratio is None and self.keep is None:
            return max(1, min(image.n, int(round(self.subset_ratio * image.n_received))))
        return super().budget(image)

    def select(self, image: ImageView, n_keep: int | None) -> Selection:
        picks = max_min_greedy(image.embeds, image.n if n_keep is None else n_keep)
        return Selection(keep=torch.sort(picks).values)
