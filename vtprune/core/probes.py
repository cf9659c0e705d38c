"""Typed probes: what a method may observe during a forward, each recording only what is asked.

A method returns probes from ``probes(model)``; the session attaches each once (equal probes are merged) and a
method reads what one recorded as ``image[probe]``, sliced to that image (or crop) and its current tokens.
Recorders run inside the attention chain (SDPA stays on for the whole model) or as forward hooks; records
live in the per-forward context and are dropped with it.

Vision probes (vision tower; one record per run of ``get_image_features``):
    VisionCLS(layers)            CLS query's attention row, all heads
    VisionValues(layers)         value vectors, all heads
    VisionAttentionMap(layers)   full attention map, mean over heads
    FeatureLayer()               the :class:`VisionView` (feature-layer CLS attention and keys, projector inputs)
    ProjectorInput()             the model's own projector input
LLM probes (prefill only; rows refer to the layout of the layer they were recorded at):
    LLMAttention(layer, queries) attention probabilities of the last prompt token or the instruction tokens
    LLMQKV(layer)                post-RoPE query of the last prompt token, keys and values
    Residual(layer)              the residual stream entering a decoder layer
    LayerOutput(layer)           a decoder layer's output (before the next layer's cut), instruction rows per image
    Sublayer(layer, part)        input and output of the attention (``"attn"``) or FFN (``"mlp"``) sublayer
    IncomingAttention(layer, q)  the attention layer ``layer`` would compute on the hidden states entering it,
                                 before a cut there decides (its own norm, q/k projections and RoPE)
    PatchEntropy()               information entropy of each vision patch's pixels (vision probe)
``image.batch(probe)`` gives the batch-level record where a probe has one (LLM probes: whole [B, T] rows), for
decisions that need every position (softmax over a sample's sequence).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import PruneError
from .layout import instruction_slots, mask_4d, slots_of
from .vision_view import vision_view

QUERY_SETS = ("last", "instruction")


@dataclass(frozen=True)
class CropSlice:
    """A vision-stage cut's view of one crop: ``n`` current patches, probe rows recorded in [since, until)."""

    crop: int
    n: int
    since: int
    until: int


@dataclass(frozen=True)
class ImageSlice:
    """An LLM-side cut's view of one image: its span, the forward, the adapter and its current tokens."""

    span: Any
    forward: Any
    adapter: Any
    index: torch.Tensor  # [n] original indices of the image's current tokens

    def crops(self) -> slice:
        first, n = self.forward.crop_ranges(self.adapter)[self.span.image]
        return slice(first, first + n)

    def sources(self, device) -> torch.Tensor:
        """[N, S] positions in this image's vision sequences feeding each token (-1 pads)."""
        return self.adapter.token_sources(self.forward.source(self.span), self.forward.image_sizes).to(device)

    def to_tokens(self, per_position: torch.Tensor) -> torch.Tensor:
        """[crops * S] values per vision position -> [N] per token, summed over the positions feeding it."""
        src = self.sources(per_position.device)
        return (per_position[src.clamp(min=0)] * (src >= 0)).sum(1)

    def rows(self, record_layout) -> torch.Tensor:
        """[n] slots of the current tokens in the layout a record was made in."""
        return slots_of(record_layout, self.span.image, self.index)

    def token_grid(self) -> torch.Tensor:
        """[N, 3] (grid, row, col) of every token of the image (adapter geometry)."""
        return self.adapter.token_grid(self.forward.source(self.span), self.forward.image_sizes)

    def from_patches(self, per_patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[crops, P] per vision patch (CLS excluded) -> ([N] summed over each token's patches, [N] bool: the token
        has patches; newline tokens have none)."""
        seq = self.adapter.vision_seq_len
        per_position = per_patch.new_zeros(per_patch.shape[0], seq)
        per_position[:, seq - per_patch.shape[1]:] = per_patch
        src = self.sources(per_patch.device)
        return self.to_tokens(per_position.reshape(-1)), (src >= 0).any(1)


class Probe:
    """Base: ``scope`` is "vision" or "llm"; ``attach`` installs the recorders; ``for_crop`` / ``for_image`` slice
    a record for a vision-stage or an LLM-side cut."""

    scope: ClassVar[str] = "llm"

    def check(self, info) -> None:
        """Raise PruneError when a layer does not exist in the model (``info``: ModelInfo)."""

    def attach(self, host) -> None:
        raise NotImplementedError

    def for_crop(self, record, where: CropSlice):
        raise PruneError(f"vtprune: probe {self} has no per-crop view (vision-stage cuts); use it at an LLM-side cut")

    def for_image(self, record, where: ImageSlice):
        raise PruneError(f"vtprune: probe {self} has no per-image view; use it at a vision-stage cut")

    def for_batch(self, record, where: ImageSlice):
        raise PruneError(f"vtprune: probe {self} has no batch-level view")


def _check_vision(probe, layers, info) -> None:
    bad = [j for j in layers if not 0 <= j < info.vision_layers]
    if bad:
        raise PruneError(f"vtprune: {probe} observes vision layer {bad[0]}; the tower has 0..{info.vision_layers - 1}")


def _check_llm(probe, layer, info) -> None:
    if not 0 <= layer < info.llm_layers:
        raise PruneError(f"vtprune: {probe} observes LLM layer {layer}; the model has layers 0..{info.llm_layers - 1}")


def _masked_logits(logits: torch.Tensor, mask, rows: slice, keys: int, causal: bool = False) -> torch.Tensor:
    """Apply the model's mask to the logits of query ``rows``; with no mask, a causal layer (the LLM: SDPA's
    ``is_causal`` path passes None) still hides later keys from each row."""
    if isinstance(mask, torch.Tensor):
        m = mask[:, :, rows, :keys]
        return logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
    if causal:  # the rows are the last queries of a prefill: row r is query keys - rows + r
        first = keys - logits.shape[-2]
        later = torch.arange(keys, device=logits.device)[None] > torch.arange(first, keys, device=logits.device)[:, None]
        return logits.masked_fill(later, float("-inf"))
    return logits


def _scaling(query: torch.Tensor, kwargs: dict) -> float:
    return kwargs.get("scaling") or query.shape[-1] ** -0.5


def _cls_row(query, key, mask, kwargs) -> torch.Tensor:
    """[crops, H, n+1] attention probabilities of the CLS query (row 0)."""
    logits = (query[:, :, :1].float() @ key.float().transpose(-1, -2)) * _scaling(query, kwargs)
    return _masked_logits(logits, mask, slice(0, 1), key.shape[2]).softmax(-1)[:, :, 0]


def _vision_attention(host, layers, record):
    """Put ``record(run_records, layer, module, q, k, v, mask, kwargs)`` in the chain of each vision layer."""
    a = host.adapter
    for j in layers:
        def fn(next, module, query, key, value, attention_mask, j=j, **kwargs):
            run = host.vision_run()
            if run is not None:
                record(run.records, j, query, key, value, attention_mask, kwargs)
            return next(module, query, key, value, attention_mask, **kwargs)

        host.hooks.attention(a.vision_attention(a.vision_layers[j]), fn, "record")


# --- vision probes -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _VisionLayers(Probe):
    """Base of the probes recording something per vision layer: ``record`` is {layer: [crops, ...]}."""

    layers: tuple[int, ...]
    scope: ClassVar[str] = "vision"

    def check(self, info):
        _check_vision(self, self.layers, info)

    @staticmethod
    def since_last_cut(record, where: CropSlice):
        """(layer, [crops, ...]) recorded in [the previous vision cut, this one): their rows have this crop's n."""
        return [(l, r) for l, r in sorted(record.items()) if where.since <= l < where.until]

    @staticmethod
    def full_grid(record, where: ImageSlice):
        """(layer, [crops, ...]) recorded before any vision cut (the full S-position grid)."""
        return [(l, r) for l, r in sorted(record.items()) if r.shape[-1] == where.adapter.vision_seq_len]


@dataclass(frozen=True)
class VisionCLS(_VisionLayers):
    """At a vision cut: {layer: [H, n+1]} CLS row (CLS column first) for layers in [previous cut, this cut). At an
    LLM-side cut: {layer: [N]} head-mean CLS attention summed over each token's patches (full-grid layers only)."""

    def attach(self, host):
        def record(records, j, query, key, value, mask, kwargs):
            rec = records.setdefault(self, {})
            if j not in rec:
                rec[j] = _cls_row(query, key, mask, kwargs)

        _vision_attention(host, self.layers, record)

    def for_crop(self, record, where):
        return {l: r[where.crop][:, : where.n + 1] for l, r in self.since_last_cut(record, where)}

    def for_image(self, record, where):
        return {l: where.to_tokens(r[where.crops()].mean(1).reshape(-1)) for l, r in self.full_grid(record, where)}


@dataclass(frozen=True)
class VisionValues(_VisionLayers):
    """At a vision cut: {layer: [H, n+1, d]} value vectors (CLS first) for layers in [previous cut, this cut)."""

    def attach(self, host):
        def record(records, j, query, key, value, mask, kwargs):
            records.setdefault(self, {}).setdefault(j, value.float())

        _vision_attention(host, self.layers, record)

    def for_crop(self, record, where):
        return {l: r[where.crop][:, : where.n + 1] for l, r in self.since_last_cut(record, where)}


@dataclass(frozen=True)
class VisionAttentionMap(_VisionLayers):
    """Head-mean attention map (``per_head=True``: every head). At a vision cut: {layer: [(H,) n+1, n+1]} (CLS
    first); at an LLM-side cut: {layer: [crops, (H,) S, S]} over the image's crops (full-grid layers only)."""

    per_head: bool = False

    def attach(self, host):
        def record(records, j, query, key, value, mask, kwargs):
            rec = records.setdefault(self, {})
            if j not in rec:
                logits = (query.float() @ key.float().transpose(-1, -2)) * _scaling(query, kwargs)
                probs = _masked_logits(logits, mask, slice(None), key.shape[2]).softmax(-1)
                rec[j] = probs if self.per_head else probs.mean(1)

        _vision_attention(host, self.layers, record)

    def for_crop(self, record, where):
        k = where.n + 1
        return {l: r[where.crop][..., :k, :k] for l, r in self.since_last_cut(record, where)}

    def for_image(self, record, where):
        return {l: r[where.crops()] for l, r in self.full_grid(record, where)}


@dataclass(frozen=True)
class ProjectorInput(Probe):
    """[N, D_in] the model's own projector input row of each token, or None when a token has none (newlines)."""

    scope: ClassVar[str] = "vision"

    def attach(self, host):
        def record(module, args):
            run = host.vision_run()
            if run is not None and self not in run.records:  # the model's call only: methods may project merges
                run.records[self] = args[0]

        host.hooks.pre(host.adapter.projector, record, with_kwargs=False)

    def for_image(self, record, where):
        rows = where.adapter.projector_rows(where.forward.source(where.span), where.forward.image_sizes)
        crops = where.crops()
        flat = record[crops].reshape(-1, record.shape[-1])
        return flat[rows.to(flat.device)] if bool((rows >= 0).all()) else None


@dataclass(frozen=True)
class FeatureLayer(Probe):
    """The :class:`~vtprune.core.vision_view.VisionView` of an image at the feature layer the model reads: CLS
    attention and keys mapped onto its tokens, projector inputs, the CLS vector, per-crop views on anyres."""

    scope: ClassVar[str] = "vision"

    def attach(self, host):
        a = host.adapter
        feature = a.vision_feature_layer

        def record(records, j, query, key, value, mask, kwargs):
            rec = records.setdefault(self, {})
            if "cls" not in rec:
                rec.update(cls=_cls_row(query, key, mask, kwargs).sum(1), keys=key.float().mean(1), n_crops=query.shape[0])

        def hidden(module, args, output):
            run = host.vision_run()
            if run is not None:
                out = output[0] if isinstance(output, tuple) else output
                run.records.setdefault(self, {}).setdefault("hidden_cls", out[:, 0])

        _vision_attention(host, (feature,), record)
        host.hooks.post(a.vision_layers[feature], hidden)
        ProjectorInput().attach(host)

    def for_image(self, record, where):
        return vision_view(record, where, ProjectorInput())  # model geometry: built in core/vision_view.py


@dataclass(frozen=True)
class PatchEntropy(Probe):
    """[crops, P] information entropy (bits, 0..8) of each vision patch of the image's crops: the pixels the tower
    saw, de-normalised with the adapter's mean / std to 0..255, grey = channel mean, a 256-bin histogram."""

    scope: ClassVar[str] = "vision"

    def attach(self, host):
        def record(module, args, kwargs):
            run = host.vision_run()
            if run is not None and self not in run.records:
                run.records[self] = args[0] if args else kwargs["pixel_values"]

        host.hooks.pre(host.adapter.vision_tower, record)

    def for_image(self, record, where):
        a = where.adapter
        pixels = record[where.crops()].float()
        mean = torch.tensor(a.pixel_mean, device=pixels.device)[:, None, None]
        std = torch.tensor(a.pixel_std, device=pixels.device)[:, None, None]
        grey = ((pixels * std + mean) * 255).mean(1).round().clamp(0, 255).long()  # [crops, H, W]
        side = int(round((a.vision_seq_len - 1) ** 0.5))
        p = grey.shape[-1] // side
        patches = grey.unfold(1, p, p).unfold(2, p, p).reshape(grey.shape[0], side * side, p * p)
        counts = torch.zeros(*patches.shape[:2], 256, device=grey.device).scatter_add_(
            2, patches, torch.ones_like(patches, dtype=torch.float))
        prob = counts / (p * p)
        return -(prob * torch.log2(prob + 1e-10)).sum(-1)


# --- LLM probes ----------------------------------------------------------------------------------------------
def _llm_attention(host, layer, record):
    """Put ``record(forward, q, k, v, mask, kwargs)`` in the chain of LLM layer ``layer`` (prefill only)."""
    def fn(next, module, query, key, value, attention_mask, **kwargs):
        fwd = host.prefill()
        if fwd is not None and query.shape[2] > 1:
            record(fwd, query, key, value, attention_mask, kwargs)
        return next(module, query, key, value, attention_mask, **kwargs)

    host.hooks.attention(host.adapter.decoder_layers[layer].self_attn, fn, "record")


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    groups = heads // x.shape[1]
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


@dataclass(frozen=True)
class LLMAttention(Probe):
    """Attention probabilities at LLM layer ``layer`` of the last prompt token (``queries="last"``: [H, n] per
    image) or of every prompt token after the sample's last image (``"instruction"``: [H, q, n]); columns are the
    image's current tokens."""

    layer: int
    queries: str = "last"

    def __post_init__(self):
        if self.queries not in QUERY_SETS:
            raise PruneError(f"vtprune: LLMAttention queries={self.queries!r}; use one of {QUERY_SETS}")

    def check(self, info):
        _check_llm(self, self.layer, info)

    def _first_row(self, layout, spans, length: int) -> int:
        """The first query row recorded: the last one, or the earliest instruction start of the batch."""
        if self.queries == "last":
            return length - 1
        starts = [instruction_slots(layout, spans, b) for b in range(layout.valid.shape[0])]
        return min((int(s[0]) for s in starts if s.numel()), default=length - 1)

    def attach(self, host):
        def record(fwd, query, key, value, mask, kwargs):
            layout = fwd.layout_at(self.layer)
            first = self._first_row(layout, fwd.spans, query.shape[2])
            k = _repeat_kv(key, query.shape[1]).float()
            logits = (query[:, :, first:].float() @ k.transpose(-1, -2)) * _scaling(query, kwargs)
            probs = _masked_logits(logits, mask, slice(first, None), k.shape[2], causal=True).softmax(-1)  # [B, H, q, T]
            fwd.records[self] = (probs, layout, first)

        _llm_attention(host, self.layer, record)

    def for_image(self, record, where):
        probs, layout, first = record
        cols = where.rows(layout)
        sample = probs[where.span.sample]
        if self.queries == "last":
            return sample[:, -1, cols]
        rows = instruction_slots(layout, where.forward.spans, where.span.sample) - first
        return sample[:, rows][:, :, cols]


@dataclass(frozen=True)
class LLMQKV(Probe):
    """Post-RoPE rows of LLM layer ``layer`` per image: ``q_last`` [H, d] and ``v_last`` [H, d] of the last prompt
    token, ``keys`` / ``values`` [H, n, d] of the image's current tokens (KV heads repeated), ``scaling``."""

    layer: int

    def check(self, info):
        _check_llm(self, self.layer, info)

    def attach(self, host):
        def record(fwd, query, key, value, mask, kwargs):
            heads = query.shape[1]
            fwd.records[self] = (dict(q_last=query[:, :, -1].float(), keys=_repeat_kv(key, heads).float(),
                                      values=_repeat_kv(value, heads).float(),
                                      scaling=_scaling(query, kwargs)),
                                 fwd.layout_at(self.layer))

        _llm_attention(host, self.layer, record)

    def for_image(self, record, where):
        rec, layout = record
        b, cols = where.span.sample, where.rows(layout)
        return dict(q_last=rec["q_last"][b], v_last=rec["values"][b][:, -1], keys=rec["keys"][b][:, cols],
                    values=rec["values"][b][:, cols], scaling=rec["scaling"])


@dataclass(frozen=True)
class Residual(Probe):
    """[n, D] the residual stream entering decoder layer ``layer`` (after any cut before it), per image."""

    layer: int

    def check(self, info):
        _check_llm(self, self.layer, info)

    def attach(self, host):
        def record(module, args, kwargs):
            fwd = host.prefill()
            if fwd is not None:
                hidden = args[0] if args else kwargs["hidden_states"]
                fwd.records[self] = (hidden, fwd.layout_at(self.layer))

        host.hooks.pre(host.adapter.decoder_layers[self.layer], record)  # after the session's cut hooks

    def for_image(self, record, where):
        hidden, layout = record
        return hidden[where.span.sample, where.rows(layout)]


@dataclass(frozen=True)
class LayerOutput(Probe):
    """What decoder layer ``layer`` outputs (before any cut before the next layer), per image: the rows of its
    sample's instruction tokens (every prompt token after the sample's last image, the last prompt token last),
    [q, D]."""

    layer: int

    def check(self, info):
        _check_llm(self, self.layer, info)

    def attach(self, host):
        def record(module, args, output):
            fwd = host.prefill()
            if fwd is not None:
                hidden = output[0] if isinstance(output, tuple) else output
                fwd.records[self] = (hidden, fwd.layout_at(self.layer))

        host.hooks.post(host.adapter.decoder_layers[self.layer], record)

    def for_image(self, record, where):
        hidden, layout = record
        return hidden[where.span.sample, instruction_slots(layout, where.forward.spans, where.span.sample)]


@dataclass(frozen=True)
class Sublayer(Probe):
    """(input, output), each [n, D] per image, of LLM layer ``layer``'s attention (``part="attn"``) or FFN
    (``"mlp"``) sublayer: after its norm, before the residual add."""

    layer: int
    part: str = "attn"
    PARTS: ClassVar[tuple[str, ...]] = ("attn", "mlp")

    def __post_init__(self):
        if self.part not in self.PARTS:
            raise PruneError(f"vtprune: Sublayer part={self.part!r}; use one of {self.PARTS}")

    def check(self, info):
        _check_llm(self, self.layer, info)

    def attach(self, host):
        def record(module, args, kwargs, output):
            fwd = host.prefill()
            if fwd is not None:
                x = args[0] if args else kwargs["hidden_states"]
                y = output[0] if isinstance(output, tuple) else output
                fwd.records[self] = (x, y, fwd.layout_at(self.layer))

        host.hooks.post(host.adapter.decoder_sublayer(self.layer, self.part), record, with_kwargs=True)

    def for_image(self, record, where):
        x, y, layout = record
        return SublayerRows(x, y, where.span.sample, where.rows(layout))

    def for_batch(self, record, where):
        x, y, layout = record
        return SublayerBatch(x, y, layout.valid)


@dataclass(frozen=True)
class SublayerRows:
    """One image's rows of a :class:`Sublayer` record: ``slots`` [n] of its current tokens in the recorded layout;
    ``input`` / ``output`` [n, D] (gathered on access)."""

    x: torch.Tensor
    y: torch.Tensor
    sample: int
    slots: torch.Tensor

    @property
    def input(self) -> torch.Tensor:
        return self.x[self.sample, self.slots]

    @property
    def output(self) -> torch.Tensor:
        return self.y[self.sample, self.slots]


@dataclass(frozen=True)
class SublayerBatch:
    """A :class:`Sublayer` record for the whole batch: input / output [B, T, D], valid [B, T] (padding False)."""

    input: torch.Tensor
    output: torch.Tensor
    valid: torch.Tensor


@dataclass(frozen=True)
class IncomingAttention(LLMAttention):
    """Like :class:`LLMAttention`, but what layer ``layer`` would compute on the hidden states *entering* it, before
    a cut before that layer runs (its input norm, q/k projections, RoPE at the current positions, causal and
    padding mask); for a method that decides the cut before ``layer`` from ``layer``'s own attention."""

    def attach(self, host):
        def record(module, args, kwargs):
            fwd = host.prefill()
            if fwd is None:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            layout = fwd.layout_at(self.layer)  # this layer's own cut has not run yet
            rotary = layout.position_embeddings if layout.position_embeddings is not None else kwargs["position_embeddings"]
            first = self._first_row(layout, fwd.spans, hidden.shape[1])
            q, k, scaling = host.adapter.preview_qk(self.layer, hidden, rotary, rows=slice(first, None))
            k = _repeat_kv(k, q.shape[1]).float()
            logits = (q.float() @ k.transpose(-1, -2)) * scaling
            allowed = mask_4d(layout.valid, q.shape[2], logits.dtype, boolean=True)
            fwd.records[self] = (logits.masked_fill(~allowed, float("-inf")).softmax(-1), layout, first)

        host.hooks.pre(host.adapter.decoder_layers[self.layer], record, prepend=True)  # before the cut hook
