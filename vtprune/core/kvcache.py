"""KV stores a method can put in place of one layer's cache (``compat.set_cache_store``): transformers sees the
store's *logical* length (the prompt's plus the generated tokens), attention gets the store's tensors.

``EvictedKV``: only some prompt tokens per sample, right-aligned [B, H, P, d], with ``valid`` [B, P + g] saying
which slots hold a token (ZipVL v2, spec zipvl.md §1.6b). ``PackedKV``: every token, as chunks of low-bit codes
per sample (ZipVL v1 / ZipCache, §1.6: K per channel, V per token after the per-channel scaling c, important
tokens at ``bits[0]``, the rest at ``bits[1]``) plus an exact buffer of the tokens appended since the last
``compress``; the codes are dequantised on the fly for each attention call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels.kvquant import dequantize, pack, quantize, unpack


class EvictedKV:
    """Kept prompt tokens of one layer: keys / values [B, H, P, d] right-aligned, ``valid`` [B, P + generated]."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, logical: int):
        self.keys, self.values, self.valid, self.length = keys, values, valid, logical

    @classmethod
    def keep(cls, keys: torch.Tensor, values: torch.Tensor, slots: list[torch.Tensor]) -> EvictedKV:
        """Keep ``slots[b]`` (ascending) of each sample of a [B, H, T, d] cache layer, right-aligned."""
        B, H, T, d = keys.shape
        P = max(len(s) for s in slots)
        k, v = keys.new_zeros(B, H, P, d), values.new_zeros(B, H, P, d)
        valid = torch.zeros(B, P, dtype=torch.bool, device=keys.device)
        for b, s in enumerate(slots):
            k[b, :, P - len(s):], v[b, :, P - len(s):] = keys[b][:, s], values[b][:, s]
            valid[b, P - len(s):] = True
        return cls(k, v, valid, T)

    @property
    def device(self):
        return self.keys.device

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys, self.values = torch.cat([self.keys, keys], 2), torch.cat([self.values, values], 2)
        self.valid = torch.cat([self.valid, self.valid.new_ones(keys.shape[0], keys.shape[2])], 1)
        self.length += keys.shape[2]
        return self.keys, self.values

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values

    def select(self, index: torch.Tensor) -> None:
        """Batch rows ``index`` (beam reordering, batch selection)."""
        index = index.to(self.keys.device)
        self.keys, self.values, self.valid = (x.index_select(0, index) for x in (self.keys, self.values, self.valid))

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


@dataclass
class Chunk:
    """One sample's tokens of one compression, [H, n, d] once dequantised: the first ``start`` slots are padding
    (zeros), ``important`` (1-bit packed over the n slots) marks the tokens at ``bits[0]``, the others ``bits[1]``.
    ``k`` / ``v``: per bit width (high, low) the packed codes, scale and zero; ``c``: V's channel scale [H, 1, d]."""

    n: int
    start: int
    d: int
    bits: tuple[int, int]
    important: torch.Tensor
    k: tuple
    v: tuple
    c: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        parts = [self.important, self.c]
        for group in self.k + self.v:
            parts += [t for t in group if t is not None]
        return parts

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())


def packed_bytes(kv_heads: int, head_dim: int, high: int, low: int, slots: int, element_bytes: int, bits) -> int:
    """Bytes of one :class:`Chunk`: ``high`` / ``low`` tokens at ``bits[0]`` / ``bits[1]`` (codes of K and V,
    K's scale + zero per channel and V's per token in each non-empty group, V's channel scale c) and the 1-bit
    importance mask over its ``slots`` (padding included)."""
    codes = 2 * kv_heads * sum(n * math.ceil(head_dim * b / 8) for n, b in ((high, bits[0]), (low, bits[1])))
    k_stats = 2 * kv_heads * head_dim * element_bytes * ((high > 0) + (low > 0))
    v_stats = 2 * (high + low) * element_bytes
    return codes + k_stats + v_stats + kv_heads * head_dim * element_bytes + math.ceil(slots / 8)


def compress(keys: torch.Tensor, values: torch.Tensor, important: torch.Tensor, start: int, bits) -> Chunk:
    """keys / values [H, n, d] of one sample, ``important`` [n] bool (slots < ``start`` are padding) -> a Chunk."""
    H, n, d = keys.shape
    real = torch.arange(n, device=keys.device) >= start
    c = values[:, real].float().abs().amax(1, keepdim=True).sqrt().clamp_min(1e-6).to(values.dtype)  # [H, 1, d]
    scaled = (values.float() / c.float()).to(values.dtype)
    k, v = [], []
    for width, rows in zip(bits, (important & real, ~important & real)):
        k.append(_group(keys[:, rows], width, (1,)))  # per channel: over the group's tokens
        v.append(_group(scaled[:, rows], width, (0, 2)))  # per token: over every head's channels
    return Chunk(n, start, d, tuple(bits), pack(important.to(torch.uint8), 1), tuple(k), tuple(v), c)


def _group(x: torch.Tensor, bits: int, dims) -> tuple:
    if x.shape[1] == 0:
        return (None, None, None)
    codes, scale, zero = quantize(x, bits, dims)
    return pack(codes, bits), scale, zero


def decompress(chunk: Chunk, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The Chunk's keys and values [H, n, d] (padding slots zero)."""
    important = unpack(chunk.important, 1, chunk.n).bool()
    real = torch.arange(chunk.n, device=important.device) >= chunk.start
    H = chunk.c.shape[0]
    out = []
    for groups in (chunk.k, chunk.v):
        x = torch.zeros(H, chunk.n, chunk.d, dtype=dtype, device=important.device)
        for width, rows, (codes, scale, zero) in zip(chunk.bits, (important & real, ~important & real), groups):
            if codes is not None:
                x[:, rows] = dequantize(unpack(codes, width, chunk.d), scale, zero).to(dtype)
        out.append(x)
    return out[0], (out[1].float() * chunk.c.float()).to(dtype)


class PackedKV:
    """Every token of one layer: per sample a list of Chunks, then the exact [B, H, g, d] tokens appended since."""

    def __init__(self, chunks: list[list[Chunk]], exact_k: torch.Tensor, exact_v: torch.Tensor):
        self.chunks, self.exact_k, self.exact_v = chunks, exact_k, exact_v
        self.length = sum(c.n for c in chunks[0]) + exact_k.shape[2]

    @property
    def device(self):
        return self.exact_k.device

    @property
    def pending(self) -> int:
        """Exact tokens waiting for the next compression."""
        return self.exact_k.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.exact_k, self.exact_v = torch.cat([self.exact_k, keys], 2), torch.cat([self.exact_v, values], 2)
        self.length += keys.shape[2]
        return self.tensors()

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantised chunks then the exact tokens: keys, values [B, H, length, d]."""
        dtype = self.exact_k.dtype
        per_sample = [[decompress(c, dtype) for c in sample] for sample in self.chunks]
        keys = torch.stack([torch.cat([k for k, _ in s], 1) for s in per_sample]) if self.chunks[0] else None
        values = torch.stack([torch.cat([v for _, v in s], 1) for s in per_sample]) if self.chunks[0] else None
        if keys is None:
            return self.exact_k, self.exact_v
        return torch.cat([keys, self.exact_k], 2), torch.cat([values, self.exact_v], 2)

    def compress(self, important: torch.Tensor, bits) -> None:
        """Pack the exact tokens: ``important`` [B, g] bool marks those at ``bits[0]``."""
        for b, sample in enumerate(self.chunks):
            sample.append(compress(self.exact_k[b], self.exact_v[b], important[b], 0, bits))
        self.exact_k, self.exact_v = self.exact_k[:, :, :0], self.exact_v[:, :, :0]

    def select(self, index: torch.Tensor) -> None:
        self.chunks = [list(self.chunks[i]) for i in index.tolist()]
        index = index.to(self.exact_k.device)
        self.exact_k, self.exact_v = self.exact_k.index_select(0, index), self.exact_v.index_select(0, index)

    def nbytes(self) -> int:
        """Bytes held: every chunk's codes, scales, zeros and masks, and the exact tokens."""
        return sum(c.nbytes() for s in self.chunks for c in s) + self.exact_k.nbytes + self.exact_v.nbytes
