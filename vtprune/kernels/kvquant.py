"""Low-bit KV codes (torch): asymmetric min-max quantisation and packing of 1/2/4/8-bit codes into bytes.

ZipCache / ZipVL v1 (spec zipvl.md §1.6): keys per channel, values per token after dividing each channel by
c = sqrt(max |V|). These helpers are the arithmetic only; ``vtprune.core.kvcache`` lays the codes out.
"""

from __future__ import annotations

import torch


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] (each < 2**bits) -> uint8 [..., ceil(n bits / 8)], code i of a byte at bit i * bits."""
    per = 8 // bits
    n = codes.shape[-1]
    pad = (-n) % per
    if pad:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], pad)], -1)
    grouped = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (grouped << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of :func:`pack`: uint8 [..., bytes] -> uint8 codes [..., n]."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]


def quantize(x: torch.Tensor, bits: int, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max over ``dims`` (the statistics' group): (uint8 codes like x, scale, zero) where
    x ~ codes * scale + zero; scale and zero keep x's dtype and shape with ``dims`` of size 1. Rounding to the
    nearest code keeps every element within half a step (scale / 2) of x."""
    xf = x.float()
    lo, hi = xf.amin(dims, keepdim=True), xf.amax(dims, keepdim=True)
    scale = ((hi - lo) / ((1 << bits) - 1)).clamp_min(torch.finfo(torch.float32).tiny)
    scale, lo = scale.to(x.dtype), lo.to(x.dtype)
    codes = ((xf - lo.float()) / scale.float()).round().clamp(0, (1 << bits) - 1).to(torch.uint8)
    return codes, scale, lo


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes.float() * scale.float() + zero.float()).to(scale.dtype)
