"""What a modulator is handed: one attention call of one LLM layer, never the session."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class AttentionCall:
    """query: [B, H, q, d] (post-RoPE); key / value: [B, H_kv, T, d]; mask: what the model passes (None, bool
    True = attend, or additive). layer: LLM layer index. visual: [B, T] bool, True where a key slot holds a
    visual token *in this layer's layout* (cut tokens are gone; generated tokens are text), None when the forward
    has no images. ``records``: the LLM-side probe records of this forward (empty in decode steps)."""

    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    kwargs: dict
    layer: int
    visual: torch.Tensor | None
    next: Callable = field(repr=False)
    records: dict = field(default_factory=dict, repr=False)
    layout: Any = field(default=None, repr=False)  # the core Layout of this layer's segment
    spans: list = field(default_factory=list, repr=False)  # the images (VisualSpan), batch order
    shared: dict = field(default_factory=dict, repr=False)  # the method's scratch for this prefill and its decode
    view: Callable | None = field(default=None, repr=False)  # (probe, span) -> per-image view (prefill only)
    stats: Any = field(default=None, repr=False)  # the prefill's PruneStats (None in decode): ``reports`` is the method's

    def image_slots(self, span) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots [n] of the image's tokens in this layer's layout, their original indices [n])."""
        return self.layout.images[span.image], self.layout.image_index[span.image]

    def to_positions(self, values: torch.Tensor) -> torch.Tensor:
        """[B, T] values of this layer's slots -> [B, P] per original prompt position (zero where no token is), for
        scratch kept into decode steps, whose cache may have another layout (``evict_early_kv``)."""
        orig, valid = self.layout.orig, self.layout.valid
        out = values.new_zeros(values.shape[0], int(orig.max()) + 1)
        rows = torch.arange(values.shape[0], device=values.device)[:, None].expand_as(orig)
        out[rows[valid], orig[valid]] = values[valid]
        return out

    def from_positions(self, by_position: torch.Tensor) -> torch.Tensor:
        """[B, P] per original prompt position (``to_positions``) -> [B, T] per key slot of this call: the tokens of
        the layout this layer's cache really holds, then the generated tokens (zero)."""
        orig, valid = self.layout.orig, self.layout.valid
        at = by_position.gather(1, orig.clamp(min=0)).masked_fill(~valid, 0)
        extra = self.key.shape[2] - at.shape[1]
        return torch.cat([at, at.new_zeros(at.shape[0], extra)], 1) if extra > 0 else at

    def geometry(self, span):
        """The image's token geometry at prefill (``from_patches``, ``token_grid``): a core ImageSlice."""
        if self.view is None:
            raise RuntimeError("vtprune: token geometry is available in the prefill only")
        return self.view(None, span)

    def image(self, probe, span):
        """A declared probe's view of one image at prefill (as ``image[probe]`` at a cut)."""
        if self.view is None:
            raise RuntimeError("vtprune: probe views are available in the prefill only; keep what decode needs in call.shared")
        return self.view(probe, span)

    @property
    def scaling(self) -> float:
        return self.kwargs.get("scaling") or self.query.shape[-1] ** -0.5

    @property
    def is_prefill(self) -> bool:
        return self.query.shape[2] > 1

    def repeated(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H_kv, T, d] -> [B, H, T, d] (grouped-query heads repeated)."""
        groups = self.query.shape[1] // x.shape[1]
        return x.repeat_interleave(groups, dim=1) if groups > 1 else x

    def allowed(self) -> torch.Tensor:
        """[B|1, 1, q, T] bool: which keys each query may attend to (causal when the model passes no mask)."""
        q, T = self.query.shape[2], self.key.shape[2]
        if self.mask is None:
            return torch.ones(q, T, dtype=torch.bool, device=self.query.device).tril(T - q)[None, None]
        m = self.mask[..., :T]
        return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2

    def logits(self, rows: slice | None = None) -> torch.Tensor:
        """[B, H, r, T] float32 scaled q.k logits of query ``rows`` (all by default), masked keys at -inf."""
        rows = rows if rows is not None else slice(None)
        q = self.query[:, :, rows].float()
        logits = (q @ self.repeated(self.key).float().transpose(-1, -2)) * self.scaling
        return logits.masked_fill(~self.allowed()[:, :, rows], float("-inf"))

    def probs(self, rows: slice | None = None) -> torch.Tensor:
        """[B, H, r, T] attention probabilities of query ``rows``."""
        return self.logits(rows).softmax(-1)

    def run(self, bias: torch.Tensor | None = None, **tensors):
        """The rest of the chain (finally the model's own attention) with an additive logit ``bias`` broadcast to
        [B, H, q, T] and optionally replaced ``query`` / ``key`` / ``value``; returns ``(output, weights)``."""
        q, k, v = (tensors.get(n, getattr(self, n)) for n in ("query", "key", "value"))
        mask = self.mask
        if bias is not None:
            dtype = q.dtype
            mask = torch.zeros(self.allowed().shape, dtype=dtype, device=q.device).masked_fill(
                ~self.allowed(), torch.finfo(dtype).min) + bias.to(dtype)
        return self.next(self.module, q, k, v, mask, **self.kwargs)

    def run_rows(self, rows: torch.Tensor, bias: torch.Tensor | None = None, **tensors):
        """``run(bias=..., ...)`` on the (head, query) ``rows`` ([B|1, H|1, q] bool), the plain ``run()`` on the
        others, so untouched rows are the model's own. Returns ``(output [B, q, H, d], weights [B, H, q, T])``;
        weights are what the model's attention gives (eager: the modulated probabilities on ``rows``, SDPA: None),
        so ``output_attentions`` still returns every layer."""
        edited, edited_weights = self.run(bias=bias, **tensors)
        if bool(rows.all()):
            return edited, edited_weights
        plain, plain_weights = self.run()
        output = torch.where(rows.transpose(1, 2)[..., None], edited, plain)
        if edited_weights is None or plain_weights is None:
            return output, None
        return output, torch.where(rows[..., None], edited_weights, plain_weights)
