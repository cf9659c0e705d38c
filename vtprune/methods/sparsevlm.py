"""SparseVLM (Zhang et al., ICML 2025, "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference"), spec sparsevlm_pdrop.md §1. Official code (Gumpest/SparseVLMs ``main``) authoritative.

``version="v1.5"`` (the official default, §1.3-1.8): text *raters* are chosen once from the LLM input embeddings:
r = mean over the image's N rows of softmax over the text of V T^T (raw dot products, no 1/sqrt(D)); raters =
{t : r_t > mean r}, text = every prompt token after the sample's last image. At pruning layer l (official 2, 6,
15; cut *after* l, i.e. before l + 1) the score of each current visual token is layer l's own attention
probability from the rater rows (head mean, rater mean, no renormalisation; recorded in fp32, the code uses fp16).
Keep the top min(k_s, n - 1) in original order; the top m = int(0.3 d) + 1 of the d deleted tokens (by the same
score) are clustered by DPC-kNN (:func:`dpc_knn_merge`) into int(m / 10) + 1 unweighted means of layer l's output
rows, inserted right after the kept tokens (they are visual tokens for the later stages). Positions are renumbered
(decode positions shift per stage).

``version="plus"`` (SparseVLM+, the repo's ``USE_VERSION=2_0``, §1.4 / §1.10): the probabilities are divided by
the RoPE "gravity" G(delta) = (2 / sqrt(d)) sum_f cos(delta theta_f) of each (rater row, visual column) pair,
computed analytically from the layer's rotary tables for those rows and columns only; per head the mass rater
rows -> visual columns picks the top ``priority_heads`` heads (official 14 of 32; other head counts scale it,
round(14 H / 32)); no recycling; original position ids. G falls below ``min_gravity`` for distances of ~1.5k tokens
(Llama RoPE, base 1e4) and turns negative at 1707: there it is clamped to ``min_gravity`` (default 0.1) and the
stage's stats note counts the clamped pairs.

Schedules (§1.5-1.6): ``schedule="table"``: the official keep tables for 192 / 128 / 96 / 64 verbatim on 576-token
images. Any other budget or image size: the shape of the version's 192 table scaled by one multiplier alpha
(k_s = round(alpha t_s N0 / 576)) solved by bisection so that the layer average hits the budget within a token:
``convention="code"`` (default) is the official counter (layer l counts as already pruned, recycled tokens
included: 192 -> 192.03), ``"input"`` the per-layer input count (SV#35: 206.5; ``stats.equivalent_tokens``).
``stats`` reports both (``equivalent_tokens`` and ``equivalent_tokens_post_cut``). ``keep=`` is per standard
image (anyres scaled), ``ratio=`` 1 - the average fraction; none = the official default ``RETAIN_TOKN=192`` (N0 / 3
elsewhere). ``schedule="rank"`` (v1 paper code): at layers 2, 6, 15, 19, keep min(int(rank(P) scale + bias), n - 1)
with P the head-mean rater x visual attention; a stage with rank = n is skipped; no budget.

Where we differ from the code: batched (raters, scores and schedules per image and sample), padding, several
images (each its own raters against the instruction after the sample's last image; official: one image), every
family, SDPA kept (rater rows only are computed), fp32 scores; DPC-kNN without its 1e-6 random tie-break noise
(ties: lower index). Recycled tokens reuse the slots right after the kept ones, so a method after SparseVLM in a
pipeline (and ``evict_early_kv``) sees them under those slots' original indices; SparseVLM's own stats report the
kept original tokens (recycled ones are counted in ``tokens_out`` but have no index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budget import tokens_to_keep
from ..core.probes import LLMAttention, Residual, Rotary
from ..core.registration import register
from ..errors import ConfigError
from ..space import Choice, Int, Seq, tuned
from .base import Cut, ImageView, Method, Selection, top_k_sorted
from .pdrop import average_tokens, relative_layers

TABLES = {  # score.py sparse_token_dict: RETAIN_TOKN -> keep per stage (576-token images)
    "v1.5": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "plus": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
TABLE_N = 576
LAYERS = {"table": (2, 6, 15), "rank": (2, 6, 15, 19)}  # pruning layers of the 32-layer Vicuna-7B (cut after)
VERSIONS, SCHEDULES, CONVENTIONS = ("v1.5", "plus"), ("table", "rank"), ("code", "input")


def recycled_count(deleted: int) -> int:
    """Clusters recycled from ``deleted`` tokens: int(m / 10) + 1 of the top m = int(0.3 d) + 1 (spec §1.7)."""
    return (int(0.3 * deleted) + 1) // 10 + 1 if deleted > 0 else 0


@register
@dataclass
class SparseVLM(Method):
    """``layers``: 0-based pruning layers, cut after (None: 2, 6, 15 / rank 2, 6, 15, 19 by relative depth)."""

    version: str = tuned("v1.5", Choice(VERSIONS))
    schedule: str = "table"
    layers: tuple[int, ...] | None = tuned(None, Seq(Int(0, lambda _, model: model.llm_layers - 2), n=3, order="increasing",
                                                     derive=lambda m, model: m.prune_layers(model)))
    convention: str = "code"
    table: tuple[int, ...] | None = None  # explicit keep per stage (every image; instead of a budget)
    scale: float = 13.5  # rank schedule (v1 MME script: 13.5 / 0; POPE 9 / 6; TextVQA 0.8 / 0)
    bias: float = 0.0
    priority_heads: int | None = None  # plus: None = round(14 H / 32)
    min_gravity: float = 0.1
    positions: str = "renumber"

    name: ClassVar[str] = "sparsevlm"
    description: ClassVar[str] = "Text raters' attention at LLM layers 2, 6, 15, recycled DPC-kNN merges (SparseVLM v1.5 / +)."
    budget_optional: ClassVar[bool] = True
    budget_kind: ClassVar[str] = "average"

    def check_fields(self) -> None:
        if self.version not in VERSIONS:
            raise self.field_error("version", f"one of {VERSIONS} (v1.5: official default; plus: SparseVLM+)")
        if self.schedule not in SCHEDULES:
            raise self.field_error("schedule", f"one of {SCHEDULES} (official tables, or the v1 rank rule)")
        if self.convention not in CONVENTIONS:
            raise self.field_error("convention", f"one of {CONVENTIONS} (official post-cut counter, or layer inputs)")
        if self.table is not None and (self.keep is not None or self.ratio is not None or self.schedule == "rank"
                                       or any(k < 0 for k in self.table)):
            raise self.field_error("table", "counts >= 0 per stage, without keep / ratio and with schedule='table'")
        if self.table is not None and self.layers is None and len(self.table) != len(LAYERS["table"]):
            raise self.field_error("table", "3 counts (one per default layer), or give layers= of the same length")
        if self.schedule == "rank" and (self.keep is not None or self.ratio is not None):
            raise ConfigError("vtprune: sparsevlm schedule='rank' sets its counts from the rank (scale, bias); "
                              "drop keep / ratio or use schedule='table'")
        if self.layers is not None and (not self.layers or self.layers[0] < 0 or list(self.layers) != sorted(set(self.layers))
                                        or self.schedule == "table" and len(self.layers) != len(self.table or (0,) * 3)):
            raise self.field_error("layers", "strictly increasing LLM layers >= 0, one per table stage (3 by default)")
        if self.priority_heads is not None and self.priority_heads < 1:
            raise self.field_error("priority_heads", "a head count >= 1 (plus only)")
        if not 0.0 < self.min_gravity:
            raise self.field_error("min_gravity", "a positive clamp for the gravity divisor (plus only)")
        if self.positions != "renumber":  # the version decides (positions_at)
            raise self.field_error("positions", "left out: v1.5 renumbers (recycled tokens have no original position, "
                                                "spec Q4), plus keeps the original ids (official)")

    def positions_at(self, cut: Cut) -> str:
        return "original" if self.version == "plus" else "renumber"

    def prune_layers(self, model) -> tuple[int, ...]:
        """0-based layers whose attention scores a cut after them (relative depth: round(l L / 32), spec Q3)."""
        if self.layers is not None:
            return self.layers
        mapped: list[int] = []
        for l in LAYERS[self.schedule]:
            mapped.append(max(int(l * model.llm_layers / 32 + 0.5), mapped[-1] + 1 if mapped else 0))
        return tuple(mapped)

    def setup(self, model) -> None:
        if self.prune_layers(model)[-1] + 1 >= model.llm_layers:
            raise ConfigError(f"vtprune: sparsevlm layers={self.prune_layers(model)}: a cut after the last LLM layer "
                              f"({model.llm_layers - 1}) removes nothing; use earlier layers")

    def cuts(self, model):
        return tuple(Cut("llm", l + 1) for l in self.prune_layers(model))

    def probes(self, model):
        rows = (Residual(0), Residual(0, "instruction"))
        scores = tuple(LLMAttention(l, "instruction") for l in self.prune_layers(model))
        return rows + scores + (tuple(Rotary(l) for l in self.prune_layers(model)) if self.version == "plus" else ())

    # --- raters and scores ------------------------------------------------------------------------------
    def raters(self, image: ImageView) -> torch.Tensor:
        """[q] bool over the instruction rows: softmax_t(V T^T) averaged over the image rows > its mean (§1.3);
        computed once per image from the LLM input embeddings."""
        if "raters" not in image.state:
            v = image[Residual(0)].float()  # [N, D]
            t = image[Residual(0, "instruction")].float()  # [q, D]
            r = (v @ t.T).softmax(-1).mean(0) if t.shape[0] else t.new_zeros(0)
            image.state["raters"] = r > r.mean()
        return image.state["raters"]

    def rater_rows(self, image: ImageView) -> tuple[torch.Tensor, str | None]:
        """([r, n] head-mean attention of the rater rows to the current visual tokens at the pruning layer, a
        stats note or None)."""
        layer = image.layer - 1
        probs = image[LLMAttention(layer, "instruction")][:, self.raters(image)]  # [H, r, n]
        note = None if probs.shape[1] else "no raters (no text after the image): scores are 0"
        if self.version == "plus" and probs.shape[1]:
            probs, note = self.gravity_and_heads(image, layer, probs)
        return probs.mean(0), note

    def gravity_and_heads(self, image: ImageView, layer: int, probs: torch.Tensor) -> tuple[torch.Tensor, str | None]:
        """SparseVLM+ (§1.4 v2): probs / G(pos_row - pos_col) with G from the layer's rotary tables of those rows
        and columns only (clamped below at ``min_gravity``), then the top priority heads by rater -> visual mass."""
        rot = image[Rotary(layer)]
        raters = self.raters(image)
        cos_r, sin_r = rot["rows"][0][raters].float(), rot["rows"][1][raters].float()  # [r, d]
        cos_c, sin_c = rot["cols"][0].float(), rot["cols"][1].float()  # [n, d]
        gravity = (cos_r @ cos_c.T + sin_r @ sin_c.T) / math.sqrt(cos_r.shape[-1])  # (R_i 1).(R_j 1) / sqrt(d)
        low = gravity < self.min_gravity
        probs = probs / gravity.clamp_min(self.min_gravity)[None]
        heads = probs.shape[0]
        top = min(heads, self.priority_heads or max(1, int(14 * heads / 32 + 0.5)))
        mass = probs.sum((1, 2))
        chosen = torch.sort(mass, descending=True, stable=True).indices[:top]
        note = f"gravity clamped at {self.min_gravity:g} for {int(low.sum())} (rater, token) pairs" if bool(low.any()) else None
        return probs[chosen], note

    # --- counts -------------------------------------------------------------------------------------------
    def table_counts(self, image: ImageView) -> tuple[int, ...]:
        """Per-stage keep targets k_s for this image (before the min with n - 1), computed once per image."""
        if self.table is not None:
            return self.table
        if "k" not in image.state:
            n0, model = image.n_received, image.model
            if self.ratio is not None:
                target = n0 * (1.0 - self.ratio)
            elif self.keep is not None:
                target = float(tokens_to_keep(image.n_tokens, None, self.keep, image.nominal, self.name))
            else:
                target = n0 * 192 / TABLE_N  # official default RETAIN_TOKN=192
            table = TABLES[self.version]
            if n0 == TABLE_N and (self.keep in table or self.keep is None and self.ratio is None):
                image.state["k"] = table[self.keep or 192]
            else:
                layers = self.prune_layers(model) if self.convention == "code" else tuple(l + 1 for l in self.prune_layers(model))
                image.state["k"] = solve_scale(n0, target, table[192], layers, model.llm_layers, self.version == "v1.5")
        return image.state["k"]

    def rank_count(self, rows: torch.Tensor) -> int | None:
        """v1 rule (§1.5a): min(int(rank(P) scale + bias), n - 1); None when rank(P) = n (the stage is skipped)."""
        n = rows.shape[1]
        rank = int(torch.linalg.matrix_rank(rows.float())) if rows.numel() else 0
        return None if n - rank == 0 else max(0, min(int(rank * self.scale + self.bias), n - 1))

    # --- the cut ------------------------------------------------------------------------------------------
    def select_batch(self, images: list[ImageView]) -> list[Selection]:
        return [self.select_one(image) for image in images]

    def select_one(self, image: ImageView) -> Selection:
        stage = self.prune_layers(image.model).index(image.layer - 1)
        rows, note = self.rater_rows(image)  # [r, n]
        score = rows.mean(0) if rows.shape[0] else torch.zeros(image.n, device=image.embeds.device)
        if self.schedule == "rank":
            k = self.rank_count(rows)
            if k is None:
                return Selection(keep=torch.arange(image.n, device=image.embeds.device), note="rank = n: stage skipped")
        else:
            k = min(self.table_counts(image)[stage], image.n - 1)
        keep = top_k_sorted(score, k)
        ids = image.state.get("ids", image.index)  # original index of each current slot (-1: recycled)
        if self.version == "plus":
            image.state["ids"] = ids[keep]
            return Selection(keep=keep, sources=ids[keep], note=note)
        merged = self.recycle(image, score, keep)
        slots = torch.arange(keep.numel() + merged.shape[0], device=keep.device)
        image.state["ids"] = torch.cat([ids[keep], ids.new_full((merged.shape[0],), -1)])
        values = torch.cat([image.embeds[keep], merged.to(image.embeds.dtype)])
        return Selection(keep=slots, values=values, sources=ids[keep], note=note)

    def recycle(self, image: ImageView, score: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """[c, D] DPC-kNN cluster means of the top m = int(0.3 d) + 1 deleted tokens by score (layer l's output)."""
        deleted = torch.ones(image.n, dtype=torch.bool, device=score.device)
        deleted[keep] = False
        gone = torch.nonzero(deleted).flatten()
        if not gone.numel():
            return image.embeds.new_zeros(0, image.embeds.shape[-1])
        m = int(0.3 * gone.numel()) + 1
        order = torch.sort(score[gone], descending=True, stable=True).indices[:m]
        return dpc_knn_merge(image.embeds[gone[order]].float(), m // 10 + 1)


def dpc_knn_merge(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """[c, D] DPC-kNN (TCFormer; SparseVLM utils.cluster_and_merge) of x [m, D] into c unweighted means:
    distances L2 / sqrt(D); density exp(-mean squared distance to the c nearest, self included); delta = distance to
    the nearest denser token (the max distance for the densest); centres = top-c of density x delta (in that
    order); every token joins its nearest centre, each centre its own cluster. No random tie-break noise."""
    m = x.shape[0]
    dist = torch.cdist(x[None], x[None])[0] / math.sqrt(x.shape[-1])
    near = torch.topk(dist, k=clusters, dim=-1, largest=False).values
    density = (-(near ** 2).mean(-1)).exp()
    denser = density[None, :] > density[:, None]
    delta = torch.where(denser, dist, dist.max()).min(-1).values
    centres = torch.sort(delta * density, descending=True, stable=True).indices[:clusters]
    assign = dist[centres].argmin(0)  # [m] nearest centre
    assign[centres] = torch.arange(clusters, device=x.device)
    sums = x.new_zeros(clusters, x.shape[-1]).index_add_(0, assign, x)
    counts = x.new_zeros(clusters).index_add_(0, assign, x.new_ones(m))
    return sums / (counts[:, None] + 1e-6)


def stage_counts(n0: int, ks, recycle: bool) -> list[int]:
    """Visual tokens after each stage: min(k_s, n - 1) kept plus the recycled clusters (spec §1.6)."""
    counts, n = [], n0
    for k in ks:
        kept = max(0, min(k, n - 1))
        n = kept + (recycled_count(n - kept) if recycle else 0)
        counts.append(n)
    return counts


def solve_scale(n0: int, target: float, shape, layers, depth: int, recycle: bool, steps: int = 50) -> tuple[int, ...]:
    """k_s = round(alpha shape_s n0 / 576) with alpha solved so that the layer average (stage s's count from layer
    ``layers[s]`` on: the pruning layer itself for the code convention, the next one for layer inputs) is closest
    to ``target``."""
    def ks(alpha: float) -> tuple[int, ...]:
        return tuple(int(alpha * t * n0 / TABLE_N + 0.5) for t in shape)

    def average(alpha: float) -> float:
        return average_tokens(n0, stage_counts(n0, ks(alpha), recycle), layers, depth)

    lo, hi = 0.0, TABLE_N / shape[0]
    if average(hi) <= target:
        return ks(hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if average(mid) < target else (lo, mid)
    return min((ks(lo), ks(hi)), key=lambda k: abs(average_tokens(n0, stage_counts(n0, k, recycle), layers, depth) - target))
