"""LLM probes (prefill only; rows refer to the layout of the layer they were recorded at): ``LLMAttention``,
``LLMQKV``, ``Residual``, ``LayerOutput``, ``Sublayer`` (with its ``SublayerRows`` / ``SublayerBatch`` views),
``IncomingAttention``, ``Instruction``, ``Rotary``; see :mod:`.probes`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import PruneError
from .layout import instruction_slots, mask_4d
from .probe_base import QUERY_SETS, Probe, _check_llm, _masked_logits, _scaling


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
    token, ``keys`` / ``values`` [H, n, d] of the image's current tokens (KV heads repeated), ``scaling``;
    ``instruction_keys`` [H, q, d] of the sample's instruction tokens (every prompt token after its last image);
    ``positions`` [n] / ``instruction_positions`` [q]: each row's index in its own unpadded, unpruned prompt."""

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
        text = instruction_slots(layout, where.forward.spans, b)
        return dict(q_last=rec["q_last"][b], v_last=rec["values"][b][:, -1], keys=rec["keys"][b][:, cols],
                    values=rec["values"][b][:, cols], scaling=rec["scaling"],
                    instruction_keys=rec["keys"][b][:, text], positions=_unpadded(layout, b, cols),
                    instruction_positions=_unpadded(layout, b, text))


def _unpadded(layout, sample: int, slots: torch.Tensor) -> torch.Tensor:
    """[s] original positions of ``slots`` counted from the sample's first real token (left padding removed)."""
    first = layout.orig[sample][layout.valid[sample]].min()
    return layout.orig[sample, slots] - first


@dataclass(frozen=True)
class Residual(Probe):
    """[n, D] the residual stream entering decoder layer ``layer`` (after any cut before it), per image; with
    ``rows="instruction"`` the rows of the image's sample's instruction tokens instead (every prompt token after the
    sample's last image, as :class:`LayerOutput`), [q, D] (``Residual(0, "instruction")``: the LLM input embeddings
    of the text SparseVLM's raters are chosen from)."""

    layer: int
    rows: str = "image"
    ROWS: ClassVar[tuple[str, ...]] = ("image", "instruction")

    def __post_init__(self):
        if self.rows not in self.ROWS:
            raise PruneError(f"vtprune: Residual rows={self.rows!r}; use one of {self.ROWS}")

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
        if self.rows == "instruction":
            return hidden[where.span.sample, instruction_slots(layout, where.forward.spans, where.span.sample)]
        return hidden[where.span.sample, where.rows(layout)]


@dataclass(frozen=True)
class LayerOutput(Probe):
    """What decoder layer ``layer`` outputs (before any cut before the next layer), per image: the rows of its
    sample's instruction tokens (``rows="instruction"``: every prompt token after the sample's last image, the
    last prompt token last, [q, D]) or of the image's current tokens (``rows="image"``, [n, D]). ``final_norm``:
    the rows after the LLM's final norm (the one before the LM head, with its weight), as DART compares them."""

    layer: int
    rows: str = "instruction"
    final_norm: bool = False
    ROWS: ClassVar[tuple[str, ...]] = ("instruction", "image")

    def __post_init__(self):
        if self.rows not in self.ROWS:
            raise PruneError(f"vtprune: LayerOutput rows={self.rows!r}; use one of {self.ROWS}")

    def check(self, info):
        _check_llm(self, self.layer, info)

    def attach(self, host):
        norm = host.adapter.final_norm if self.final_norm else None

        def record(module, args, output):
            fwd = host.prefill()
            if fwd is not None:
                hidden = output[0] if isinstance(output, tuple) else output
                fwd.records[self] = (hidden, fwd.layout_at(self.layer), norm)

        host.hooks.post(host.adapter.decoder_layers[self.layer], record)

    def for_image(self, record, where):
        hidden, layout, norm = record
        b = where.span.sample
        slots = where.rows(layout) if self.rows == "image" else instruction_slots(layout, where.forward.spans, b)
        rows = hidden[b, slots]
        return rows if norm is None else norm(rows)  # a per-row norm: the same rows as normalising the batch


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


@dataclass(frozen=True)
class Instruction(Probe):
    """The sample's instruction (every prompt token after its last image) per image, from the prompt's
    ``input_ids`` (recorded at the model's entry, so also at the LLM input cut): ``ids`` [q] token ids;
    ``embeds()`` [q, D] their rows of the LLM's input embedding table."""

    def attach(self, host):
        embed = host.adapter.model.get_input_embeddings()

        def record(module, args, kwargs):
            fwd = host.starting()
            ids = kwargs.get("input_ids", args[0] if args else None)
            if fwd is not None and ids is not None:
                fwd.records[self] = (ids, embed)

        host.hooks.pre(host.adapter.model, record)  # after the session's own entry hook, which sets up the Forward

    def for_image(self, record, where):
        ids, embed = record
        b = where.span.sample
        end = max(s.start + s.length for s in where.forward.spans if s.sample == b)
        return InstructionRows(ids[b, end:], embed)


@dataclass(frozen=True)
class InstructionRows:
    """One sample's instruction: ``ids`` [q]; ``embeds()`` [q, D] their input-embedding rows."""

    ids: torch.Tensor
    embed: object

    def embeds(self) -> torch.Tensor:
        return self.embed(self.ids)


@dataclass(frozen=True)
class Rotary(Probe):
    """The rotary tables decoder layer ``layer`` applies (its segment's positions), per image: ``{"rows": (cos,
    sin) [q, d] of the sample's instruction tokens, "cols": (cos, sin) [n, d] of the image's current tokens}``; for
    position-only terms computed for the rows and columns needed (SparseVLM+'s RoPE gravity)."""

    layer: int

    def check(self, info):
        _check_llm(self, self.layer, info)

    def attach(self, host):
        def record(module, args, kwargs):
            fwd = host.prefill()
            if fwd is not None:
                layout = fwd.layout_at(self.layer)
                rotary = layout.position_embeddings if layout.position_embeddings is not None else kwargs["position_embeddings"]
                fwd.records[self] = (rotary, layout)

        host.hooks.pre(host.adapter.decoder_layers[self.layer], record)  # after the session's cut hooks

    def for_image(self, record, where):
        (cos, sin), layout = record
        b = where.span.sample if cos.shape[0] > 1 else 0
        rows, cols = instruction_slots(layout, where.forward.spans, where.span.sample), where.rows(layout)
        return {"rows": (cos[b, rows], sin[b, rows]), "cols": (cos[b, cols], sin[b, cols])}
