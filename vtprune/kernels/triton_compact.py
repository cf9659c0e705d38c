"""Triton kernel behind :func:`vtprune.kernels.compact_` (imported lazily; needs ``triton``).

The caller (``compact.py``) validates the inputs; this module only maps an
arbitrary-stride tensor onto the kernel's canonical 5-D view and launches it.
See ``compact.py`` for why the in-place sweeps are race-free.

Canonical view of ``x``: ``[B, M, T, F1, F2]`` with arbitrary strides, where M
is the (coalesced) product of the dims between batch and token axis and
``F = F1 * F2`` the (coalesced) trailing feature columns. Dims that do not
coalesce into that view are looped over on the host (rare: e.g. a permuted
5-D tensor); every such slice is an independent compaction.

Set ``TRITON_INTERPRET=1`` before importing this module to run on CPU tensors.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

# dtypes the kernel handles; anything else goes to the torch path.
SUPPORTED_DTYPES = frozenset(
    {torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32}
)

# Target elements per tile (BLOCK_R * BLOCK_C); large tiles keep the loop short,
# which matters most under the interpreter, where cost scales with iterations.
_TILE_ELEMS = 4096
_MAX_BLOCK_C = 256


@triton.jit
def _compact_kernel(
    x_ptr, idx_ptr, cnt_ptr,
    M, K, F, F2,
    sx_b, sx_m, sx_t, sx_f1, sx_f2,
    si_b, si_k,
    PAD_LEFT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program: batch row b, middle index m, BLOCK_C feature columns, all K rows."""
    pid_bm = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = (pid_bm // M).to(tl.int64)
    m = (pid_bm % M).to(tl.int64)

    cols = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = cols < F
    col_off = (cols // F2) * sx_f1 + (cols % F2) * sx_f2
    base = x_ptr + b * sx_b + m * sx_m
    cnt = tl.load(cnt_ptr + b).to(tl.int64)
    r_ar = tl.arange(0, BLOCK_R).to(tl.int64)

    # Pass 1, ascending: dst row j <- src row keep[b, j] (keep[b, j] >= j).
    # Left padding only needs the cnt kept rows here; right padding also
    # zero-fills rows [cnt, K) in the same sweep.
    if PAD_LEFT:
        n_rows = cnt
    else:
        n_rows = K + 0 * cnt
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + r_ar
        keep = rows < cnt
        src = tl.load(idx_ptr + b * si_b + rows * si_k, mask=keep, other=0).to(tl.int64)
        vals = tl.load(base + src[:, None] * sx_t + col_off[None, :],
                       mask=keep[:, None] & cmask[None, :], other=0)
        # All threads must finish reading this tile before anyone overwrites a
        # row of it (a source may sit inside the tile). No-op in the interpreter.
        tl.debug_barrier()
        tl.store(base + rows[:, None] * sx_t + col_off[None, :], vals,
                 mask=(rows < K)[:, None] & cmask[None, :])

    if PAD_LEFT:
        # Pass 2, descending: dst row d <- row d - shift (source <= destination),
        # rows d < shift become zero. Skipped entirely when nothing moves.
        shift = K - cnt
        n_tiles = tl.where(shift > 0, tl.cdiv(K, BLOCK_R), 0)
        tl.debug_barrier()  # pass-1 stores are visible to every thread
        for t in range(0, n_tiles):
            rows = K - (t + 1) * BLOCK_R + r_ar
            in_range = rows >= 0
            src = rows - shift
            has_src = in_range & (src >= 0)
            vals = tl.load(base + src[:, None] * sx_t + col_off[None, :],
                           mask=has_src[:, None] & cmask[None, :], other=0)
            tl.debug_barrier()
            tl.store(base + rows[:, None] * sx_t + col_off[None, :], vals,
                     mask=in_range[:, None] & cmask[None, :])


# Detected from the decorated object: the interpreter flag is read at decoration time.
INTERPRETED = type(_compact_kernel).__name__ == "InterpretedFunction"


def _coalesce(sizes, strides):
    """Drop size-1 dims and merge neighbours that form one strided run; returns [(size, stride)]."""
    out: list[tuple[int, int]] = []
    for n, s in zip(sizes, strides):
        if n == 1:
            continue
        if out and out[-1][1] == n * s:
            out[-1] = (out[-1][0] * n, s)
        else:
            out.append((n, s))
    return out


def _pow2_at_most(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), cap)


def compact_triton_(x: torch.Tensor, keep_index: torch.Tensor, dim: int,
                    counts: torch.Tensor, pad_left: bool) -> None:
    """In-place compaction of ``x`` (token axis ``dim`` >= 1) on x's device.

    ``keep_index``: [B, K] int32/int64, ``counts``: [B] int64, both already
    validated and on x's device. Rows 0..K-1 of ``x`` along ``dim`` are written.
    """
    B, T = x.shape[0], x.shape[dim]
    K = keep_index.shape[1]
    if x.numel() == 0 or K == 0:
        return
    sizes, strides = list(x.shape), list(x.stride())
    middle = _coalesce(sizes[1:dim], strides[1:dim]) or [(1, 0)]
    trailing = _coalesce(sizes[dim + 1:], strides[dim + 1:])
    trailing = [(1, 0)] * max(0, 2 - len(trailing)) + trailing
    # Dims that do not fit the 5-D view are looped over on the host.
    outer = middle[:-1] + trailing[:-2]
    (M, s_m), ((F1, s_f1), (F2, s_f2)) = middle[-1], trailing[-2:]
    F = F1 * F2

    block_c = _pow2_at_most(F, _MAX_BLOCK_C)
    block_r = _pow2_at_most(K, max(1, _TILE_ELEMS // block_c))
    grid = (B * M, triton.cdiv(F, block_c))
    view_size = (B, M, T, F1, F2)
    view_stride = (x.stride(0), s_m, x.stride(dim), s_f1, s_f2)
    for idx in itertools.product(*(range(n) for n, _ in outer)):
        offset = x.storage_offset() + sum(i * s for i, (_, s) in zip(idx, outer))
        # as_strided view of the same storage: the kernel writes into x itself.
        xv = x.as_strided(view_size, view_stride, offset)
        _compact_kernel[grid](
            xv, keep_index, counts,
            M, K, F, F2,
            *view_stride,
            keep_index.stride(0), keep_index.stride(1),
            PAD_LEFT=pad_left, BLOCK_R=block_r, BLOCK_C=block_c,
        )
