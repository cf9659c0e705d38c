"""The packed KV codes (spec zipvl.md §1.6, §1.12 item 6): packing is lossless, every dequantised value is within
half a quantisation step of its input (K per channel over each precision group's tokens, V per token over every
head's channels after dividing each channel by c = sqrt(max |V|)), and the bytes a store holds are the analytic
packed size, all recomputed here from the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from vtprune.core.kvcache import PackedKV, compress, decompress
from vtprune.kernels.kvquant import pack, unpack


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_then_unpack_is_exact(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 37), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == math.ceil(37 * bits / 8)
    assert torch.equal(unpack(packed, bits, 37), codes)


def _kv(H=2, n=20, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(H, n, d, generator=g) * 3, torch.randn(H, n, d, generator=g) * 2


def step(x, dims, bits):
    return (x.amax(dims, keepdim=True) - x.amin(dims, keepdim=True)) / (2 ** bits - 1)


@pytest.mark.parametrize("bits", [(4, 2), (8, 4)])
def test_dequantised_values_are_within_half_a_step(bits):
    keys, values = _kv()
    start = 3  # three padding slots: zeros, never in the statistics
    important = torch.zeros(20, dtype=torch.bool)
    important[[4, 7, 8, 15, 19]] = True
    k, v = decompress(compress(keys, values, important, start, bits), torch.float32)
    assert not k[:, :start].any() and not v[:, :start].any()
    c = values[:, start:].abs().amax(1, keepdim=True).sqrt()  # [H, 1, d]
    real = torch.arange(20) >= start
    for width, rows in zip(bits, (important & real, ~important & real)):
        k_step = step(keys[:, rows], (1,), width)  # per channel
        assert ((k[:, rows] - keys[:, rows]).abs() <= k_step / 2 + 1e-5).all()
        v_step = step(values[:, rows] / c, (0, 2), width)  # per token, over every head's channels
        assert ((v[:, rows] / c - values[:, rows] / c).abs() <= v_step / 2 + 1e-5).all()
    assert (k[:, important] - keys[:, important]).abs().max() < (k[:, ~important & real] - keys[:, ~important & real]).abs().max()


def analytic_bytes(H, d, t, u, n, elem, bits=(4, 2)):
    """Codes (K and V), K's per-channel scale + zero per group, V's per-token scale + zero, V's channel scale c,
    the 1-bit importance mask over the n slots."""
    codes = 2 * H * (t * math.ceil(d * bits[0] / 8) + u * math.ceil(d * bits[1] / 8))
    k_stats = 2 * H * d * elem * ((t > 0) + (u > 0))
    v_stats = 2 * (t + u) * elem
    return codes + k_stats + v_stats + H * d * elem + math.ceil(n / 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_measured_bytes_equal_the_analytic_packed_size(dtype):
    H, n, d = 2, 20, 8
    keys, values = (x.to(dtype) for x in _kv(H, n, d))
    important = torch.zeros(n, dtype=torch.bool)
    important[:7] = True
    starts = [0, 2]
    chunks = [[compress(keys, values, important, s, (4, 2))] for s in starts]
    exact = torch.zeros(2, H, 3, d, dtype=dtype)
    store = PackedKV(chunks, exact, exact.clone())
    elem = torch.finfo(dtype).bits // 8
    expected = sum(analytic_bytes(H, d, 7 - s, n - 7, n, elem) for s in starts) + 2 * exact.nbytes
    assert store.nbytes() == expected
    dense = 2 * 2 * H * (n + 3) * d * elem
    assert dense / store.nbytes() > 2  # sanity: far below the dense size even at this tiny head dim
