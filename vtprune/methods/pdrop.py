"""PyramidDrop (Xing et al., CVPR 2025, "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction"), spec sparsevlm_pdrop.md §2. Official code (Cooperx521/PyramidDrop,
``LlamaModel.pdrop_forward`` / ``pdrop_rank_drop``) authoritative, inference variant.

The LLM runs in stages split by the 0-based ``layers`` K_1 < K_2 < K_3 (official 8, 16, 24). Before layer K_s
runs, layer K_s's own attention is computed on the hidden states entering it (its input norm, q/k, RoPE at the
current, renumbered positions; KV heads repeated for GQA) for one query row, the last prompt token; softmax over
all keys in fp32, cast to the model dtype, mean over heads, the image's current columns (no renormalisation):
``IncomingAttention(K_s, "last")`` (§2.1-2.2). The top int(N0 * r_s) tokens are kept in original order, where
N0 is the image's token count when PDrop received it and r_s is relative to N0 (not compounded), so every kept
set is a subset of the last. Positions are renumbered after each cut (§2.3; decode positions shift per stage).

Schedules: ``ratios`` (official default 0.5, 0.25, 0.125 = lambda 0.5: 576 -> 288 -> 144 -> 72, an average of
270 tokens over Vicuna-7B's 32 layers). A ``keep=`` / ``ratio=`` budget is the *average* visual tokens over the
L LLM layers (spec §2.6; ``keep`` per standard image, anyres scaled; ``ratio``: 1 - the average fraction):
with r_s = lambda^s the schedule solves lambda in [0, 1] so that
    (K_1 N0 + sum_s (K_{s+1} - K_s) max(1, int(N0 lambda^s))) / L,   K_{S+1} = L,
is closest to the target (bisection; the int truncation makes it a step function, hit within one token). Below
the floor (K_1 N0 + (L - K_1)) / L (every stage keeping one token) no lambda reaches it. With ``layers=None`` the
first cut then moves earlier: the official (8, 16, 24), else spec §2.6's (2, 10, 20), else (2, 6, 12), the first
whose floor reaches the budget (LLaVA-1.5-7B: 192 -> official; 128 -> (2, 10, 20)); below them all a UserWarning
says every stage keeps one token. An explicit ``layers=`` that cannot reach it is a ConfigError at ``prune()``
naming the remedy (an earlier first cut, or the least reachable budget).

Other depths: the layer lists map by relative depth, round(K L / 32), strictly increasing (4-layer test LLM:
1, 2, 3). Where we differ from the code: masks are rebuilt for the shorter sequence and KV
heads are repeated, so padding, batches, several images per sample (each its own N0) and GQA LLMs work
(the code: batch 1, one image, MHA only); at least one token per image is kept.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budget import tokens_to_keep
from ..core.probes import IncomingAttention
from ..core.registration import register
from ..errors import ConfigError, PruneError
from ..space import Float, Int, Seq, tuned
from .base import Cut, ImageView, Method, Selection, top_k_sorted

DEFAULT_LAYERS, DEFAULT_DEPTH = (8, 16, 24), 32  # official layer_list on the 32-layer Vicuna-7B
# layers=None: the official list, then spec §2.6's [calc] lists for budgets below its floor (192/128, then 64)
FALLBACK_LAYERS = (DEFAULT_LAYERS, (2, 10, 20), (2, 6, 12))


def relative_layers(layers: tuple[int, ...], depth: int, name: str) -> tuple[int, ...]:
    """32-layer cut layers mapped onto a ``depth``-layer LLM: round(K depth / 32), strictly increasing, >= 1."""
    mapped: list[int] = []
    for k in layers:
        mapped.append(max(int(k * depth / DEFAULT_DEPTH + 0.5), mapped[-1] + 1 if mapped else 1))
    if mapped[-1] >= depth:
        raise PruneError(f"vtprune: {name} needs at least {len(layers) + 1} LLM layers for its default schedule; set layers=")
    return tuple(mapped)


def average_tokens(n0: int, counts, layers, depth: int) -> float:
    """Visual tokens averaged over ``depth`` layers: n0 before layers[0], counts[s] from layers[s] on (spec §2.6)."""
    bounds = list(layers) + [depth]
    return (layers[0] * n0 + sum((bounds[s + 1] - bounds[s]) * c for s, c in enumerate(counts))) / depth


@register
@dataclass
class PDrop(Method):
    """``layers``: 0-based LLM layers cut before (None: the official 8, 16, 24 by relative depth); ``ratios``:
    kept fraction of N0 after each cut (used when no ``keep`` / ``ratio`` budget is given)."""

    layers: tuple[int, ...] | None = tuned(None, Seq(Int(1, lambda _, model: model.llm_layers - 1), n=3,
                                                     order="increasing", derive=lambda m, model: m.cut_layers(model)))
    ratios: tuple[float, ...] = tuned((0.5, 0.25, 0.125), Seq(Float(0.02, 1.0), n=3, order="decreasing"))
    positions: str = "renumber"

    name: ClassVar[str] = "pdrop"
    description: ClassVar[str] = "Last-token attention of the next stage's first layer, pyramid drops in the LLM (PyramidDrop)."
    budget_optional: ClassVar[bool] = True
    budget_kind: ClassVar[str] = "average"

    def check_fields(self) -> None:
        if not self.ratios or any(not 0.0 < r <= 1.0 for r in self.ratios):
            raise self.field_error("ratios", "fractions in (0, 1] of the image's tokens kept after each cut")
        if list(self.ratios) != sorted(self.ratios, reverse=True):
            raise self.field_error("ratios", "non-increasing fractions (each cut keeps no more than the last)")
        if self.layers is not None and (len(self.layers) != len(self.ratios) or self.layers[0] < 1
                                        or list(self.layers) != sorted(set(self.layers))):
            raise self.field_error("layers", f"{len(self.ratios)} strictly increasing LLM layers >= 1, one per ratio")

    def cut_layers(self, model) -> tuple[int, ...]:
        """``layers``, or the first of FALLBACK_LAYERS (relative depth) whose floor reaches the budget."""
        if self.layers is not None:
            return self.layers
        if len(self.ratios) != len(DEFAULT_LAYERS):
            raise PruneError(f"vtprune: pdrop with {len(self.ratios)} ratios needs layers=")
        mapped = ()
        for layers in FALLBACK_LAYERS:
            mapped = relative_layers(layers, model.llm_layers, self.name)
            if self.reaches(mapped, model):
                return mapped
        return mapped

    def floor_and_target(self, layers, model) -> tuple[float, float] | None:
        """(the least layer average ``layers`` allow, the budget's average) for the model's standard image."""
        if self.keep is None and self.ratio is None or self.is_noop:
            return None
        n = model.nominal_tokens
        target = float(self.keep) if self.keep is not None else n * (1.0 - self.ratio)
        return average_tokens(n, [1] * len(layers), layers, model.llm_layers), target

    def reaches(self, layers, model) -> bool:
        bounds = self.floor_and_target(layers, model)
        return bounds is None or bounds[1] >= bounds[0] - 1

    def setup(self, model) -> None:
        """Refuse a budget an explicit layer list cannot reach (spec §2.6); warn when no default list does."""
        layers = self.cut_layers(model)
        if self.reaches(layers, model):
            return
        floor, target = self.floor_and_target(layers, model)
        if self.layers is not None:
            earlier = relative_layers(FALLBACK_LAYERS[-1], model.llm_layers, self.name)
            remedy = f"cut earlier (e.g. layers={earlier}) or " if earlier[0] < layers[0] else ""
            raise ConfigError(
                f"vtprune: pdrop cannot average {target:g} visual tokens over {model.llm_layers} LLM layers with its "
                f"first cut before layer {layers[0]} (at least {floor:.1f}: the first {layers[0]} layers see all "
                f"{model.nominal_tokens}); {remedy}give a budget >= {math.ceil(floor - 1)}")
        warnings.warn(f"vtprune: pdrop cannot average {target:g} visual tokens over this model's {model.llm_layers} "
                      f"LLM layers even with its first cut before layer {layers[0]}; every stage keeps 1 token "
                      f"(about {floor:.1f} on average; a budget >= {math.ceil(floor - 1)} is reachable)",
                      UserWarning, stacklevel=2)

    def cuts(self, model):
        return tuple(Cut("llm", k) for k in self.cut_layers(model))

    def probes(self, model):
        return tuple(IncomingAttention(k, "last") for k in self.cut_layers(model))

    def schedule(self, image: ImageView) -> list[int]:
        """Tokens kept after each cut for this image: int(N0 r_s), r from ``ratios`` or the solved lambda^s."""
        n0 = image.n_received
        if self.ratio is None and self.keep is None:
            return [max(1, int(n0 * r)) for r in self.ratios]
        if "schedule" not in image.state:
            target = (n0 * (1.0 - self.ratio) if self.ratio is not None
                      else float(tokens_to_keep(image.n_tokens, None, self.keep, image.nominal, self.name)))
            image.state["schedule"] = solve_lambda(n0, target, self.cut_layers(image.model), image.model.llm_layers)
        return image.state["schedule"]

    def select_batch(self, images: list[ImageView]) -> list[Selection]:
        out = []
        for image in images:
            stage = self.cut_layers(image.model).index(image.layer)
            probs = image[IncomingAttention(image.layer, "last")]  # [H, n], fp32 softmax over all keys
            score = probs.to(image.embeds.dtype).mean(0).float()  # official: cast back, then the head mean
            out.append(Selection(keep=top_k_sorted(score, min(self.schedule(image)[stage], image.n))))
        return out


def solve_lambda(n0: int, target: float, layers, depth: int, steps: int = 60) -> list[int]:
    """Per-stage counts max(1, int(n0 lambda^s)) whose layer average is closest to ``target`` (spec §2.6)."""
    def counts(lam: float) -> list[int]:
        return [max(1, min(n0, int(n0 * lam ** (s + 1)))) for s in range(len(layers))]

    lo, hi = 0.0, 1.0  # average(lo) < target <= average(hi), narrowed by bisection
    if average_tokens(n0, counts(hi), layers, depth) <= target:
        return counts(hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        if average_tokens(n0, counts(mid), layers, depth) < target:
            lo = mid
        else:
            hi = mid
    below, above = counts(lo), counts(hi)
    gap = [abs(average_tokens(n0, c, layers, depth) - target) for c in (below, above)]
    return below if gap[0] <= gap[1] else above
