"""DART (Wen et al., EMNLP 2025, "Stop Looking for Important Tokens in MLLMs: Duplication Matters More"), spec §2.

Algorithm (official ``DART.get_retained_image_token``, spec §2.2): layers 0..K-1 run on the full sequence; then
1. pivots: the ``pivot_image`` image tokens and the ``pivot_text`` instruction tokens (every prompt token after
   the sample's last image, chat-template tokens included) with the largest L1 norm of layer K-1's post-RoPE keys
   (heads concatenated; repeated KV heads scale every norm alike, so the ranking is the official one);
2. duplication: cosine of layer K-1's outputs after the LLM's final norm (with its weight);
3. each pivot in turn takes its quota of the least similar image tokens still in the pool (image tokens minus
   the image pivots), which leave the pool;
4. kept = image pivots + every pick; text is never pruned; kept tokens keep their original positions, and from
   layer K on (KV cache included) only they remain.

Budget (spec §2.3, §2.6). ``count="exact"`` (default): exactly the budget B = ``keep`` / ``ratio``: min(P_img, B)
image pivots and B - P_img picks shared out over the pivots in visiting order (the first (B - P_img) mod P
pivots take one more). ``count="official"``: the released count, quota B // (P_img + P_txt) per pivot, so
P_img + P x quota tokens are kept (132 for keep=128). A pool smaller than a quota gives what is left (the
official code raises). Visiting order: ``pivot_order="norm"`` (default) visits the image pivots then the text
pivots, each by decreasing key norm (the order the code builds them in); ``"official"`` iterates a Python ``set``
of their positions in the unpadded prompt, as the code does (so it depends on the prompt layout, spec §2.6).
Where we differ: the official code handles the first image of one sample at a hard-coded offset; here every
image of every sample is pruned with its sample's instruction pivots shared; LLaVA-NeXT's candidates are the
packed image tokens, newlines included (official). Attention-free: any attention implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core.probes import LayerOutput, LLMQKV
from ..core.registration import register
from ..space import Choice, Int, tuned
from .base import Cut, ImageView, Method, Selection, top_k_sorted

COUNTS = ("exact", "official")
PIVOT_ORDERS = ("norm", "official")


@register
@dataclass
class DART(Method):
    """``layer`` = K (official 2); ``pivot_image`` / ``pivot_text`` pivots per image (official 4 / 4)."""

    layer: int = tuned(2, Int(1, lambda _, model: min(model.llm_layers - 1, max(3, model.llm_layers // 4))))
    pivot_image: int = tuned(4, Int(1, 16))
    pivot_text: int = tuned(4, Int(0, 16))
    count: str = "exact"
    pivot_order: str = "norm"
    positions: str = "original"

    name: ClassVar[str] = "dart"
    description: ClassVar[str] = "Duplication to key-norm pivots (image + text) at LLM layer K-1, least similar kept from K on."

    def check_fields(self) -> None:
        if self.layer < 1:
            raise self.field_error("layer", "an LLM layer K >= 1 (pivots and similarity at K-1, cut before K)")
        if self.pivot_image < 1:
            raise self.field_error("pivot_image", "an integer >= 1 (image pivots; official 4)")
        if self.pivot_text < 0:
            raise self.field_error("pivot_text", "an integer >= 0 (instruction pivots; official 4)")
        if self.count not in COUNTS:
            raise self.field_error("count", "'exact' (keep the budget) or 'official' (budget + image pivots)")
        if self.pivot_order not in PIVOT_ORDERS:
            raise self.field_error("pivot_order", "'norm' (image then text pivots by key norm) or 'official' (set order)")

    def cuts(self, model):
        return (Cut("llm", self.layer),)

    def probes(self, model):
        k = self.layer - 1
        return (LLMQKV(k), LayerOutput(k, "image", final_norm=True), LayerOutput(k, "instruction", final_norm=True))

    def pivots(self, image: ImageView, n_image: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, int]]]:
        """(image pivots [p] into the current tokens, text pivots [t] into the instruction rows, visiting order as
        ("image" | "text", index) pairs)."""
        qkv = image[LLMQKV(self.layer - 1)]
        img_norm = qkv["keys"].abs().sum(dim=(0, 2))  # [n] L1 over heads x dims
        txt_norm = qkv["instruction_keys"].abs().sum(dim=(0, 2))  # [q]
        img = torch.topk(img_norm, min(n_image, img_norm.numel())).indices
        txt = torch.topk(txt_norm, min(self.pivot_text, txt_norm.numel())).indices
        order = [("image", int(i)) for i in img] + [("text", int(t)) for t in txt]
        if self.pivot_order == "official":  # CPython set iteration over the pivots' prompt positions
            where = {int(qkv["positions"][i]): ("image", i) for kind, i in order if kind == "image"}
            where.update({int(qkv["instruction_positions"][t]): ("text", t) for kind, t in order if kind == "text"})
            order = [where[p] for p in list(set(where))]
        return img, txt, order

    def quotas(self, n_keep: int, n_image_pivots: int, n_pivots: int) -> list[int]:
        """Picks per pivot in visiting order (module doc: ``count``)."""
        if self.count == "official":
            return [n_keep // (self.pivot_image + self.pivot_text)] * n_pivots
        rest = max(0, n_keep - n_image_pivots)
        return [rest // n_pivots + (1 if i < rest % n_pivots else 0) for i in range(n_pivots)]

    def select(self, image: ImageView, n_keep: int | None) -> Selection:
        n_keep = image.n if n_keep is None else n_keep
        if n_keep >= image.n:
            return Selection(keep=torch.arange(image.n, device=image.index.device))
        n_image = self.pivot_image if self.count == "official" else min(self.pivot_image, n_keep)
        img, txt, order = self.pivots(image, n_image)
        states = {"image": image[LayerOutput(self.layer - 1, "image", final_norm=True)].float(),
                  "text": image[LayerOutput(self.layer - 1, "instruction", final_norm=True)].float()}
        pool = torch.ones(image.n, dtype=torch.bool, device=states["image"].device)
        pool[img] = False
        kept = [img.to(pool.device)]
        for (kind, i), quota in zip(order, self.quotas(n_keep, img.numel(), len(order))):
            candidates = torch.nonzero(pool).flatten()
            cos = F.cosine_similarity(states[kind][i][None], states["image"][candidates], dim=-1)
            picks = candidates[top_k_sorted(-cos, min(quota, candidates.numel()))]  # least similar; ties: lower index
            pool[picks] = False
            kept.append(picks)
        return Selection(keep=torch.sort(torch.cat(kept)).values)
