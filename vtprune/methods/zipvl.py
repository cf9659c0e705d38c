"""ZipVL (He et al., arXiv 2410.08584 v1/v2, ICCV 2025): layer-wise dynamic token sparsification in the prefill
plus a compressed KV cache; spec ``zipvl.md`` §1 (no official code exists; the KV half is ZipCache's).

Every LLM layer, at the prefill, per sample (its valid slots only: padding is no token):

1. probe rows P: the last ``n_recent`` positions and ``n_random`` earlier ones drawn by a generator seeded from
   (``seed``, layer, n), so a sample gives the same P alone and in a padded batch (all rows when n is small);
2. A' = softmax(q[P] k^T / sqrt(d)) in fp32, causal, head mean (the full n x n map is never built);
3. a_j = sum_c A'_cj; p = the smallest count whose largest a_j reach ``tau`` of sum a (Eq. 6; tau >= 1: p = n);
4. T = the top-p keys by a_j / cnt_j, cnt_j = #{c in P : c >= j} (Eq. 7, ``norm``), sorted (Eq. 8);
5. attention on T only: Q[T], K[T], V[T] gathered, causal on the compacted order, through the model's own
   attention (SDPA stays SDPA), one call per sample; rows outside T get a zero attention output (residual and
   MLP still run), so the next layer's probes see all n tokens again (§1.5).

KV cache (``kv_mode``, §1.6-1.7; ``vtprune.core.kvcache``): "none" keeps every token exact; "evict" (v2) keeps
only T_l in layer l's cache; "mixed" (v1) packs K per channel and V per token (after the per-channel scaling
c = sqrt(max |V|)) at ``bits`` = (4, 2) for T / the rest, and repacks each ``recompress_every`` generated tokens
from the current query's attention row over them.

Readings chosen (spec §2 open questions), each a field where the paper admits another:

| point | our default | alternatives |
|---|---|---|
| head aggregation (Z1) | mean over query heads, one T per layer | (per-KV-head sets: not built) |
| Eq. 6 bound with probes | tau of the probe rows' total mass (= tau m) | - |
| Eq. 7 divisor (Z2) | ``norm="probe_nnz"``: probe rows that see key j | ``"full_causal"`` (n - j, ZipCache), ``"none"`` |
| rows outside T (Z3) | zero attention output | - |
| last prompt token (Z4) | not forced (``force_last=False``) | ``force_last=True`` puts it in T (else the first answer token can be read off a zero attention output: the embedded LLaVA's GQA falls from 91 % to ~15 %, 83 % with it) |
| token kinds (Z5) | every token, text and visual | - |
| probes | 64 recent + 64 random, fixed counts (review 4) | any counts (ZipCache: 5 % + 5 %) |
| quantiser groups (Z7) | whole channel (K) / whole token row over all heads (V), as ZipCache | - |
| decode (v1) | only the newest ``recompress_every`` tokens repacked, normalised scores of one row | - |
| decode (v2, Z6) | no eviction of generated tokens | - |
| batches (Z8) | p and T per sample | - |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .. import compat
from ..core.kvcache import EvictedKV, PackedKV, compress, packed_bytes
from ..core.layout import mask_4d
from ..core.registration import register
from ..space import Choice, Float, Int, tuned
from .base import Method

KV_MODES = ("none", "evict", "mixed")
NORMS = ("probe_nnz", "full_causal", "none")


def probe_index(n: int, n_recent: int, n_random: int, seed: int, layer: int) -> torch.Tensor:
    """[m] sorted probe rows among n positions: the last min(n_recent, n) and n_random seeded earlier ones."""
    start = max(n - n_recent, 0)
    recent = torch.arange(start, n)
    if start == 0 or n_random == 0:
        return recent
    g = torch.Generator().manual_seed((seed * 1_000_003 + layer * 10_007 + n) % 2**62)
    earlier = torch.randperm(start, generator=g)[:n_random].sort().values
    return torch.cat([earlier, recent])


def keep_count(mass: torch.Tensor, tau: float) -> int:
    """Eq. 6: the smallest p whose p largest entries of ``mass`` [n] reach ``tau`` of its sum (tau >= 1: n)."""
    n = mass.numel()
    if tau >= 1.0:
        return n
    running = mass.sort(descending=True).values.cumsum(0)
    return min(max(int((running < tau * running[-1]).sum()) + 1, 1), n)


def column_scores(probs: torch.Tensor, probes: torch.Tensor, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [m, n] (probe rows, head mean) -> (a [n] column sums, a / cnt [n] the Eq. 7 normalised scores)."""
    n = probs.shape[1]
    mass = probs.sum(0)
    keys = torch.arange(n, device=probs.device)
    if norm == "probe_nnz":
        cnt = (probes.to(probs.device)[:, None] >= keys[None]).sum(0)
    elif norm == "full_causal":
        cnt = n - keys
    else:
        cnt = torch.ones_like(keys)
    return mass, mass / cnt.clamp(min=1).to(mass.dtype)


@dataclass
class ZipVLReport:
    """What a ZipVL prefill reports (``model.vtprune.stats.reports["zipvl"]``): ``kept[l][b]`` = p of layer l for
    sample b, ``tokens[b]`` = n (the sample's tokens entering the LLM, after any pre-LLM cut)."""

    tokens: list[int]
    kept: dict[int, list[int]] = field(default_factory=dict)
    kv_mode: str = "none"
    bits: tuple[int, int] = (4, 2)

    def kv_bytes(self, kv_heads: int, head_dim: int, element_bytes: int) -> int | None:
        """Analytic bytes of the KV store after the prefill (None: ``kv_mode="none"``, the dense cache): per layer
        and sample, "evict" p dense tokens, "mixed" one packed chunk of p tokens at bits[0] and n - p at bits[1]."""
        if self.kv_mode == "none":
            return None
        per_token = 2 * kv_heads * head_dim * element_bytes
        return sum(per_token * p if self.kv_mode == "evict" else
                   packed_bytes(kv_heads, head_dim, p, n - p, n, element_bytes, self.bits)
                   for kept in self.kept.values() for p, n in zip(kept, self.tokens))

    def ratio(self, sample: int) -> float:
        """The paper's "Ratio": the layer average of p_l / n."""
        return sum(k[sample] for k in self.kept.values()) / (len(self.kept) * self.tokens[sample])

    def flop_reduction(self, sample: int) -> float:
        """Attention-FLOP reduction 1 - mean_l (p_l / n)^2 (attention cost grows with the square of its tokens)."""
        n = self.tokens[sample]
        return 1.0 - sum((k[sample] / n) ** 2 for k in self.kept.values()) / len(self.kept)

    @property
    def token_ratio(self) -> float:
        return sum(self.ratio(b) for b in range(len(self.tokens))) / len(self.tokens)

    @property
    def attention_flop_reduction(self) -> float:
        return sum(self.flop_reduction(b) for b in range(len(self.tokens))) / len(self.tokens)


@register
@dataclass
class ZipVL(Method):
    tau: float = tuned(0.975, Float(0.9, 1.0))
    n_recent: int = tuned(64, Int(8, 128, log=True))
    n_random: int = tuned(64, Int(0, 128))
    norm: str = "probe_nnz"
    force_last: bool = False
    kv_mode: str = "none"
    bits: tuple[int, int] = (4, 2)
    recompress_every: int = 100
    seed: int = 0

    name: ClassVar[str] = "zipvl"
    description: ClassVar[str] = "Per-layer attention on the tokens holding tau of the probe attention; 4/2-bit or evicted KV."
    has_budget: ClassVar[bool] = False
    sweep_variants: ClassVar[tuple[dict, ...]] = ({"kv_mode": "none"}, {"kv_mode": "evict"}, {"kv_mode": "mixed"})
    prunes: ClassVar[bool] = False
    rewrites_attention: ClassVar[bool] = True

    def check_fields(self) -> None:
        if not 0.0 < self.tau <= 1.0:
            raise self.field_error("tau", "a fraction in (0, 1] of the probe attention mass (paper: 0.96 / 0.975)")
        if self.n_recent < 1:
            raise self.field_error("n_recent", "a count >= 1 of recent probe rows (paper: 64)")
        if self.n_random < 0:
            raise self.field_error("n_random", "a count >= 0 of random probe rows (paper: 64)")
        for name, options in (("norm", NORMS), ("kv_mode", KV_MODES)):
            if getattr(self, name) not in options:
                raise self.field_error(name, "one of " + ", ".join(map(repr, options)))
        if len(self.bits) != 2 or any(b not in (2, 4, 8) for b in self.bits):
            raise self.field_error("bits", "(important, other) bits, each 2, 4 or 8 (paper: (4, 2))")
        if self.recompress_every < 1:
            raise self.field_error("recompress_every", "a count >= 1 of generated tokens (paper: 100)")

    def cuts(self, model):
        return ()

    def modulated_layers(self, model):
        return tuple(range(model.llm_layers))

    def modulate(self, call):
        if not call.is_prefill:
            return self.decode(call)
        valid = call.layout.valid
        chosen = [self.important(call, b, valid[b].nonzero()[:, 0]) for b in range(valid.shape[0])]
        self.report(call, [(len(t), int(valid[b].sum())) for b, t in enumerate(chosen)])
        call.shared.setdefault("important", {})[call.layer] = chosen
        call.shared.setdefault("tokens", {})[call.layer] = valid.sum(1).tolist()
        if all(len(t) == int(valid[b].sum()) for b, t in enumerate(chosen)):
            return None  # T = every token: the layer's own dense attention, unchanged
        return sparse_attention(call, chosen)

    def important(self, call, b: int, slots: torch.Tensor) -> torch.Tensor:
        """[p] sorted slots of sample ``b``'s important tokens T at this layer (steps 1-4)."""
        n = slots.numel()
        probes = probe_index(n, self.n_recent, self.n_random, self.seed, call.layer).to(slots.device)
        q = call.query[b, :, slots[probes]].float()  # [H, m, d]
        k = call.repeated(call.key)[b, :, slots].float()  # [H, n, d]
        logits = (q @ k.transpose(-1, -2)) * call.scaling
        causal = probes[:, None] >= torch.arange(n, device=slots.device)[None]
        probs = logits.masked_fill(~causal, float("-inf")).softmax(-1).mean(0)  # [m, n], head mean
        mass, score = column_scores(probs, probes, self.norm)
        p = keep_count(mass, self.tau)
        if self.force_last:
            score[-1] = float("inf")
        return slots[score.topk(p).indices.sort().values]

    def report(self, call, counts: list[tuple[int, int]]) -> None:
        if call.stats is None:
            return
        rep = call.stats.reports.setdefault(self.name, ZipVLReport([n for _, n in counts], kv_mode=self.kv_mode,
                                                                   bits=tuple(self.bits)))
        rep.kept[call.layer] = [p for p, _ in counts]

    @property
    def stores_kv(self) -> bool:
        return self.kv_mode != "none"

    def end_prefill(self, cache, shared: dict) -> None:
        """kv_mode "evict": each layer's cache keeps its T only; "mixed": every token packed, T at bits[0]."""
        if self.kv_mode == "none":
            return
        stores = shared.setdefault("stores", {})
        for layer, chosen in shared.get("important", {}).items():
            keys, values = compat.cache_layer_kv(cache, layer)
            stores[layer] = (EvictedKV.keep(keys, values, chosen) if self.kv_mode == "evict"
                             else self.packed(keys, values, chosen, shared["tokens"][layer]))
            compat.set_cache_store(cache, layer, stores[layer])

    def packed(self, keys: torch.Tensor, values: torch.Tensor, chosen: list[torch.Tensor], tokens: list[int]) -> PackedKV:
        """A prefill layer's [B, H, T, d] cache as one Chunk per sample (left padding stays out of the codes)."""
        T, chunks = keys.shape[2], []
        for b, slots in enumerate(chosen):
            important = torch.zeros(T, dtype=torch.bool, device=keys.device)
            important[slots] = True
            chunks.append([compress(keys[b], values[b], important, T - tokens[b], self.bits)])
        return PackedKV(chunks, keys[:, :, :0], values[:, :, :0])

    def decode(self, call):
        store = call.shared.get("stores", {}).get(call.layer)
        if store is None:
            return None
        if self.kv_mode == "evict":  # the model's mask is for the unpruned length: the store says which slots hold tokens
            boolean = compat.mask_is_boolean(compat.get_attn_implementation(call.module.config))
            mask = mask_4d(store.valid, call.query.shape[2], call.query.dtype, boolean)
            return call.next(call.module, call.query, call.key, call.value, mask, **call.kwargs)
        out = call.run()
        if store.pending >= self.recompress_every:
            self.recompress(call, store)
        return out

    def recompress(self, call, store: PackedKV) -> None:
        """Alg. 1 decode: the newest tokens' ratio and ranking from the current query's row (head mean), packed."""
        row = call.probs()[:, :, -1].mean(1)[:, -store.pending:]  # [B, g]; one row sees all: Eq. 7 divides by 1
        important = torch.zeros_like(row, dtype=torch.bool)
        for b in range(row.shape[0]):
            important[b, row[b].topk(keep_count(row[b], self.tau)).indices] = True
        store.compress(important, self.bits)


def sparse_attention(call, chosen: list[torch.Tensor]):
    """Each sample's attention on its slots ``chosen`` ([p_b], ascending) only, one call of the rest of the chain
    per sample; rows outside are zero. Returns ``(output [B, q, H, d], weights [B, H, q, T] or None)``."""
    B, H, q, d = call.query.shape
    out = call.query.new_zeros(B, q, H, d)
    weights = None
    boolean = compat.mask_is_boolean(compat.get_attn_implementation(call.module.config))
    for b, slots in enumerate(chosen):
        p = slots.numel()
        mask = mask_4d(torch.ones(1, p, dtype=torch.bool, device=slots.device), p, call.query.dtype, boolean)
        o, w = call.next(call.module, call.query[b:b + 1, :, slots], call.key[b:b + 1, :, slots],
                         call.value[b:b + 1, :, slots], mask, **call.kwargs)
        out[b, slots] = o[0].to(out.dtype)
        if w is not None:
            weights = w.new_zeros(B, H, q, call.key.shape[2]) if weights is None else weights
            weights[b][:, slots[:, None], slots[None]] = w[0]
    return out, weights
