"""A slow layer-by-layer reference for progressive in-LLM pruning (PDrop, SparseVLM), written from the model's own
pieces (never vtprune's code): one prompt, no padding, eager math, explicit positions and a causal mask rebuilt
after every cut. Each cut scores with the attention of a layer computed from the hidden states entering it."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch


def own_attention_probs(layer, h: torch.Tensor, cos, sin) -> torch.Tensor:
    """[H, L, L] fp32 causal attention probabilities of ``layer`` on ``h`` [1, L, D]: its input norm, q/k
    projections, RoPE and the KV heads repeated (GQA)."""
    attn = layer.self_attn
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    x = layer.input_layernorm(h)
    L = h.shape[1]
    q = attn.q_proj(x).view(1, L, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, L, -1, attn.head_dim).transpose(1, 2)
    q, k = rotate(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)) * attn.head_dim ** -0.5
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)[0]


@dataclass
class Cut:
    """``decide(probs [H, L, L], out [L, D] or None, slots: [n] current slots of one image, m: image number)`` ->
    (kept local indices [k] sorted, appended rows [c, D] or None). ``after``: the cut follows the layer (SparseVLM:
    scores are that layer's own attention, recycled rows its output) instead of preceding it (PDrop)."""

    decide: object
    after: bool = False


@dataclass
class Trace:
    kept: list = field(default_factory=list)  # per image, per cut: original indices kept as themselves
    counts: list = field(default_factory=list)  # per image, per cut: tokens after the cut (appended ones included)
    logits: torch.Tensor | None = None  # [V] at the last prompt token


def reference_forward(model, embeds: torch.Tensor, images: list[torch.Tensor], cuts: dict, renumber=True) -> Trace:
    """``embeds`` [1, T, D] LLM input; ``images``: each image's original positions (a contiguous run);
    ``cuts``: {layer: Cut}. Appended rows take the slots right after the image's kept tokens (official SparseVLM)."""
    lm = model.model.language_model
    # per slot: (image m, original index within the image, -1 for an appended row) or None for text
    tags = [None] * embeds.shape[1]
    for m, run in enumerate(images):
        for j, p in enumerate(run.tolist()):
            tags[p] = (m, j)
    trace = Trace(kept=[[] for _ in images], counts=[[] for _ in images])
    h, pos = embeds, torch.arange(embeds.shape[1])[None]
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            cos, sin = lm.rotary_emb(h, position_ids=pos)
            cut = cuts.get(i)
            probs = own_attention_probs(layer, h, cos, sin) if cut is not None else None
            if cut is not None and not cut.after:
                h, pos, tags = _apply(cut, probs, None, h, pos, tags, trace, len(images), renumber)
                cos, sin = lm.rotary_emb(h, position_ids=pos)
            L = h.shape[1]
            mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
            out = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos)
            h = out[0] if isinstance(out, tuple) else out
            if cut is not None and cut.after:
                h, pos, tags = _apply(cut, probs, h[0], h, pos, tags, trace, len(images), renumber)
        trace.logits = model.lm_head(lm.norm(h))[0, -1]
    return trace


def _apply(cut, probs, out, h, pos, tags, trace, n_images, renumber):
    """One cut: every image decides on its current slots; the sequence is rebuilt with kept + appended rows."""
    decided = {}
    for m in range(n_images):
        slots = torch.tensor([s for s, t in enumerate(tags) if t is not None and t[0] == m], dtype=torch.long)
        if slots.numel():
            decided[m] = (slots, *cut.decide(probs, out, slots, m))
    rows, new_tags, new_pos, done = [], [], [], set()
    for s, t in enumerate(tags):
        if t is None:
            rows.append(h[0, s]); new_tags.append(None); new_pos.append(int(pos[0, s]))
            continue
        m = t[0]
        if m in done:
            continue
        done.add(m)
        slots, keep, extra = decided[m]
        for j in keep.tolist():
            rows.append(h[0, slots[j]]); new_tags.append(tags[int(slots[j])]); new_pos.append(int(pos[0, slots[j]]))
        for r in ([] if extra is None else extra):
            rows.append(r); new_tags.append((m, -1)); new_pos.append(int(pos[0, slots[0]]))
        trace.kept[m].append(sorted(tags[int(slots[j])][1] for j in keep.tolist() if tags[int(slots[j])][1] >= 0))
        trace.counts[m].append(keep.numel() + (0 if extra is None else len(extra)))
    h = torch.stack(rows)[None]
    pos = torch.arange(len(rows))[None] if renumber else torch.tensor(new_pos)[None]
    return h, pos, new_tags


# ------------------------------------------------------------------------------------------------------------
# batch == each prompt alone (shared by the PDrop and SparseVLM tests)
def text_only(length: int, like):
    """A prompt of ``length`` text tokens and no image, shaped like ``like`` (a conftest Prompt)."""
    from ..conftest import Prompt

    return Prompt(torch.cat([torch.tensor([1]), torch.arange(length - 1) % 90 + 3]), like.pixel_values[:0], None)


def generate_batched_and_alone(model, prompts, steps: int, stages) -> tuple[list, list, list, list]:
    """(batched greedy tokens, their ``stages(stats)``, each prompt's tokens alone, their stages concatenated) of a
    model pruned by the caller; a text-only prompt alone publishes no stats."""
    from ..conftest import collate

    batched = model.generate(**collate(prompts), max_new_tokens=steps, do_sample=False)[:, -steps:].tolist()
    kept = stages(model.vtprune.stats)
    singles, single_kept = [], []
    for p in prompts:
        b = collate([p])
        if p.pixel_values.shape[0] == 0:
            b.pop("pixel_values")
        singles.append(model.generate(**b, max_new_tokens=steps, do_sample=False)[0, -steps:].tolist())
        single_kept += stages(model.vtprune.stats) if model.vtprune.stats is not None else []
    return batched, kept, singles, single_kept
