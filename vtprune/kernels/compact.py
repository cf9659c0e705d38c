"""In-place compaction of kept tokens: :func:`compact_`.

After pruning, every per-token tensor (hidden states [B, T, D], position
embeddings [B, T, d], position ids / 2-D masks [B, T], KV caches [B, H, T, d])
must keep only the selected rows along its token axis, in order, without
allocating a second copy of the tensor. ``compact_`` moves the kept rows to
the front of the token axis in x's own storage and returns
``x.narrow(dim, 0, K)``, a view that aliases ``x``.

Why in place is race-free
-------------------------
For row b the valid kept indices are sorted and unique, so ``keep[b, j] >= j``:
the source of destination j is never below j. Sweeping destinations in
ascending order therefore never reads a source row that an earlier step has
already overwritten (earlier steps only wrote rows < j <= keep[b, j]).

The Triton kernel (``triton_compact.py``) parallelises over (batch, middle
dims, feature-column blocks). Programs touch disjoint columns, so there is no
race between programs. Each program sweeps the K destination rows in
ascending tiles of BLOCK_R rows: it loads the sources of the whole tile, then
(after a barrier across its threads) stores the tile. A source inside the
current tile is read before it is written; sources beyond the tile lie at or
above the tile's end and are untouched so far; earlier tiles only wrote rows
below the tile's start.

``pad_left=True`` (left-padded layout for batched generation) adds a second
in-place pass in the same program that shifts the compacted rows
[0, counts[b]) right by K - counts[b]. There destination > source, so that
sweep runs DESCENDING, by the mirror argument, and fills rows below the shift
with zeros in the same sweep. The caller chooses K: vtprune's cuts pass
K = max(counts) (``core/layout.cut_layout``), so the longest row fills all K
slots and shorter rows are left-padded to it.

Torch path and its temporaries
------------------------------
On CPU (and without autograd) the torch path works one batch row at a time,
with the same ascending argument (``_plan_rows``). Let R = the bytes of one
token row of one batch item (x[0].numel() / T * element size: D * esize for
[B, T, D], H * d * esize for [B, H, T, d]) and, for row b, shift = K - c
(left padding) or 0, g(j) = keep[b, j] - shift - j, non-decreasing in j.

- Leading entries with g = 0 are already in place: nothing moves.
- From the first j where g(j) >= need = ceil(64 KiB / R), destination chunks
  [j, j + min(g(j), c - j)) are filled by ONE ``index_select(..., out=x's
  rows)`` each, straight from x: their sources lie at or above the chunk's
  end, so no source is overwritten before it is read, and no temporary is
  needed. Chunks grow geometrically with g, so there are few.
- The entries in between (small gaps, or g < 0: a left-padded row whose
  kept rows sit below their slots) go through a temporary: index_select into
  it first, then ``copy_`` back.
- The padding slots are zeroed last, after every source has been read.

Temporary: ONE buffer reused by every batch row, of P * R bytes, where P <=
K is the largest count of such in-between entries over the rows: 0 bytes
when no row has any (e.g. g(0) >= need without padding), at most K * R
bytes (when K * R < 64 KiB no chunk can be big enough and every row takes
the temporary whole). Index tensors add a few small int64 arrays per chunk.
Bytes moved: each kept row read + written once on the chunk path, twice via
the temporary.

Elsewhere (CUDA tensors, or x requiring grad: ``index_select(out=...)`` does
not record gradients) the torch path gathers all rows with advanced
indexing into a temporary [B, K, ...] (B * K * R bytes, plus a few [B, K]
index tensors) and ``copy_``s it back: ordering is irrelevant there.
"""

from __future__ import annotations

import os

import numpy as np
import torch

__all__ = ["compact_", "triton_available"]

_BACKENDS = ("auto", "torch", "triton")
_triton_mod = None  # None: not tried yet; False: triton missing; else the module


def _load_triton():
    """Import the Triton kernel module on first use; returns it, or None without triton."""
    global _triton_mod
    if _triton_mod is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            _triton_mod = False
        else:
            from . import triton_compact

            _triton_mod = triton_compact
    return _triton_mod or None


def triton_available() -> bool:
    """True if triton is importable (the kernel can be used for CUDA or interpreted tensors)."""
    return _load_triton() is not None


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _triton_can_run(mod, x: torch.Tensor) -> bool:
    # A kernel compiled for the GPU cannot touch CPU memory, and vice versa.
    return x.is_cuda != mod.INTERPRETED


_RANGE_ERROR = "keep_index out of range: kept indices must lie in [0, T={T})"
_ORDER_ERROR = ("keep_index must be strictly increasing within the first counts[b] entries of each row "
                "(sorted, unique)")


def _check_keep_cpu(idx: np.ndarray, cnt: np.ndarray, T: int) -> None:
    """The keep_index range / order checks on numpy views of CPU tensors (no copies): a few numpy calls
    instead of a dozen torch dispatches, which would cost more than a small compaction."""
    K = idx.shape[1]
    if cnt.min() == K:  # every entry counts (the usual case): no mask needed
        if idx.min() < 0 or idx.max() >= T:
            raise ValueError(_RANGE_ERROR.format(T=T))
        if K > 1 and (idx[:, 1:] <= idx[:, :-1]).any():
            raise ValueError(_ORDER_ERROR)
        return
    valid = np.arange(K) < cnt[:, None]  # only the first counts[b] entries of each row are meaningful
    if (valid & ((idx < 0) | (idx >= T))).any():
        raise ValueError(_RANGE_ERROR.format(T=T))
    if K > 1 and (valid[:, 1:] & (idx[:, 1:] <= idx[:, :-1])).any():
        raise ValueError(_ORDER_ERROR)


def _validate(x, keep_index, dim, counts):
    """Check shapes/ranges; returns (dim >= 1, keep_index on x.device, counts [B] int64 on x.device)."""
    dim = _check_x(x, dim)
    B, T = x.shape[0], x.shape[dim]
    keep_index = _check_keep_index(keep_index, B, T, dim).to(x.device)
    counts = _check_counts(counts, B, keep_index.shape[1], x.device)
    if B and keep_index.shape[1]:
        _check_keep_values(x, keep_index, counts, T)
    return dim, keep_index, counts


def _check_x(x, dim) -> int:
    """The token axis ``dim`` of ``x`` (>= 1: axis 0 is the batch), whose elements must be distinct in memory."""
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError(f"x must be a tensor with a batch dim and a token dim, got shape "
                         f"{tuple(getattr(x, 'shape', ()))}")
    nd = x.ndim
    if not -nd <= dim < nd:
        raise ValueError(f"dim={dim} out of range for x with {nd} dims")
    dim %= nd
    if dim == 0:
        raise ValueError("dim must be the token axis, not the batch axis 0")
    if any(st == 0 and n > 1 for n, st in zip(x.shape, x.stride())):
        raise ValueError("x has overlapping memory (a stride-0 / expanded dim); "
                         "in-place compaction needs distinct elements")
    return dim


def _check_keep_index(keep_index, B: int, T: int, dim: int):
    """keep_index: an int64 / int32 [B, K] tensor with K <= T (its values are checked by _check_keep_values)."""
    if not isinstance(keep_index, torch.Tensor) or keep_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"keep_index must be an int64 or int32 tensor, got "
                         f"{getattr(keep_index, 'dtype', type(keep_index).__name__)}")
    if keep_index.ndim != 2 or keep_index.shape[0] != B:
        raise ValueError(f"keep_index must have shape [B, K] with B={B}, got {tuple(keep_index.shape)}")
    K = keep_index.shape[1]
    if K > T:
        raise ValueError(f"keep_index keeps K={K} tokens but the token axis (dim {dim}) has only T={T}")
    return keep_index


def _check_counts(counts, B: int, K: int, device):
    """counts [B] int64 on ``device``, each in [0, K]; None means every row keeps K."""
    if counts is None:
        return torch.full((B,), K, dtype=torch.int64, device=device)
    if not isinstance(counts, torch.Tensor) or counts.dtype.is_floating_point \
            or counts.dtype == torch.bool or counts.is_complex():
        raise ValueError("counts must be an integer tensor of shape [B]")
    if tuple(counts.shape) != (B,):
        raise ValueError(f"counts must have shape [B]=({B},), got {tuple(counts.shape)}")
    counts = counts.to(device=device, dtype=torch.int64).contiguous()
    # CPU: check through numpy views (no copy); a dozen torch dispatches cost more than a small compaction.
    c = counts.numpy() if counts.device.type == "cpu" else counts
    if B and bool(((c < 0) | (c > K)).any()):
        raise ValueError(f"counts out of range: every count must be in [0, K={K}], got "
                         f"{counts.tolist() if B <= 16 else 'values outside'}")
    return counts


def _check_keep_values(x, keep_index, counts, T: int) -> None:
    """The first counts[b] entries of each keep_index row are in [0, T) and strictly increasing."""
    if x.device.type == "cpu":
        _check_keep_cpu(keep_index.numpy(), counts.numpy(), T)
        return
    K = keep_index.shape[1]
    valid = torch.arange(K, device=x.device) < counts[:, None]  # only the first counts[b] entries are meaningful
    idx = keep_index.long()
    if bool((valid & ((idx < 0) | (idx >= T))).any()):
        raise ValueError(_RANGE_ERROR.format(T=T))
    if K > 1 and bool((valid[:, 1:] & (idx[:, 1:] <= idx[:, :-1])).any()):
        raise ValueError(_ORDER_ERROR)


# A chunk moved in place by its own index_select must carry at least this many bytes: each call costs some
# 25-50 us of host overhead on a CPU (narrow, index arithmetic, dispatch), about what copying this many bytes
# back from the temporary costs; smaller chunks go through the temporary.
_MIN_CHUNK_BYTES = 64 * 1024


def _plan_rows(keep_index, counts, pad_left, row_bytes):
    """Plan every batch row: kept entry j (of c = counts[b]) goes to slot shift + j from source keep[b, j].

    Returns [(shift, c, p0, p1, chunks)] per row: entries [0, p0) are already in place, [p0, p1) go
    through the temporary, and each (j0, j1) in ``chunks`` (covering [p1, c)) moves in place with one
    index_select. The gap g(j) = keep[j] - shift - j never decreases along j (kept indices are strictly
    increasing). A chunk [j0, j1) with j1 - j0 <= g(j0) has all its sources at or above slot shift + j1:
    clear of its own writes and of every earlier chunk's. Chunks start where g reaches ``need`` rows
    (>= _MIN_CHUNK_BYTES), so each moves enough bytes to pay for its call, and they grow geometrically.
    Host-side numpy: a handful of cheap calls instead of a dozen torch dispatches.
    """
    K = keep_index.shape[1]
    cnt = counts.tolist()
    shifts = [K - c if pad_left else 0 for c in cnt]
    need = max(1, -(-_MIN_CHUNK_BYTES // max(row_bytes, 1)))
    if need > K:  # no chunk can be big enough: every row goes through the temporary
        return [(sh, c, 0, c, []) for sh, c in zip(shifts, cnt)]
    gaps = keep_index.numpy() - np.arange(K)  # per row, minus its shift below
    plans = []
    for b, (sh, c) in enumerate(zip(shifts, cnt)):
        g = gaps[b, :c] - sh if sh else gaps[b, :c]
        p0 = int(np.searchsorted(g, 0, side="right")) if c and g[0] == 0 else 0  # already in place
        p1 = max(p0, int(np.searchsorted(g, need)))
        chunks, i = [], p1
        while i < c:
            n = min(int(g[i]), c - i)
            chunks.append((i, i + n))
            i += n
        plans.append((sh, c, p0, p1, chunks))
    return plans


def _compact_rows_(x, keep_index, dim, counts, pad_left):
    """CPU torch path, one batch row at a time: index_select straight into x where the sources lie clear
    of the destinations (see :func:`_plan_rows`), through one reused temporary elsewhere; zero padding
    last, after every source has been read."""
    K = keep_index.shape[1]
    ax, T = dim - 1, x.shape[dim]  # token axis of x[b]
    plans = _plan_rows(keep_index, counts, pad_left, x[0].numel() // T * x.element_size())
    rows = max(p1 - p0 for _, _, p0, p1, _ in plans)
    tmp = None
    if rows:
        # Token axis outermost in memory, then moved into place: index_select along a middle axis into a
        # contiguous buffer takes a serial kernel, into this strided one a parallel one.
        rest = [n for i, n in enumerate(x.shape[1:]) if i != ax]
        tmp = torch.empty([rows] + rest, dtype=x.dtype, device=x.device).movedim(0, ax)
    for b, (shift, c, p0, p1, chunks) in enumerate(plans):
        xb, kb = x[b], keep_index[b]
        if p1 > p0:  # read every source of the span before any write to it
            t = tmp.narrow(ax, 0, p1 - p0)
            torch.index_select(xb, ax, kb[p0:p1], out=t)
            xb.narrow(ax, shift + p0, p1 - p0).copy_(t)
        for j0, j1 in chunks:  # ascending: later chunks read only at or above their own end
            lo = shift + j1
            torch.index_select(xb.narrow(ax, lo, T - lo), ax, kb[j0:j1] - lo,
                               out=xb.narrow(ax, shift + j0, j1 - j0))
        if c < K:
            xb.narrow(ax, 0 if pad_left else c, K - c).zero_()


def _compact_gather_(x, keep_index, dim, counts, pad_left):
    """Vectorised torch path (no host loop; autograd-friendly): gather into a temporary [B, K, ...],
    zero the padding, copy_ into x's rows [0, K)."""
    B, K = keep_index.shape
    xv = x.movedim(dim, 1)  # view [B, T, ...rest]; writes go to x
    j = torch.arange(K, device=x.device)
    # Destination slot j holds kept entry p = j - shift (shift = K - counts when left-padding).
    p = j.expand(B, K) - (K - counts[:, None] if pad_left else 0)
    valid = (p >= 0) & (p < counts[:, None])
    src = keep_index.long().gather(1, p.clamp(0, max(K - 1, 0)))
    src = torch.where(valid, src, 0)
    gathered = xv[torch.arange(B, device=x.device)[:, None], src]  # copy: [B, K, ...rest]
    gathered.masked_fill_(~valid.view(B, K, *([1] * (gathered.ndim - 2))), 0)
    xv.narrow(1, 0, K).copy_(gathered)


def _compact_torch_(x, keep_index, dim, counts, pad_left):
    """Torch path: per-row in-place moves on CPU; the vectorised gather elsewhere and under autograd
    (index_select with ``out=`` does not record gradients)."""
    if keep_index.shape[1] == 0 or x.numel() == 0:
        return
    if x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()):
        _compact_rows_(x, keep_index, dim, counts, pad_left)
    else:
        _compact_gather_(x, keep_index, dim, counts, pad_left)


def compact_(x: torch.Tensor, keep_index: torch.Tensor, dim: int, counts: torch.Tensor | None = None,
             pad_left: bool = False, backend: str = "auto") -> torch.Tensor:
    """Move kept token rows to the front of ``x``'s token axis, in place.

    x: [B, ..., T, ...] with the token axis at ``dim`` (>= 1, or negative).
    keep_index: [B, K] int64/int32; the first counts[b] entries of row b are
    strictly increasing indices in [0, T); the rest are ignored.
    counts: [B] integer in [0, K], or None for all K.

    pad_left=False: slot j < counts[b] holds original row keep_index[b, j];
    slots [counts[b], K) are zero. pad_left=True: the kept rows occupy slots
    [K - counts[b], K) in order, slots before are zero. Rows >= K are left
    unspecified. Returns ``x.narrow(dim, 0, K)``, a view aliasing ``x``.

    backend: "auto" (Triton for CUDA tensors, or under TRITON_INTERPRET=1,
    when triton is importable; else torch), "torch", or "triton". Dtypes the
    kernel does not handle (e.g. bool, int8) always use the torch path.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    dim, keep_index, counts = _validate(x, keep_index, dim, counts)
    K = keep_index.shape[1]

    use_triton = False
    if backend != "torch":
        mod = _load_triton()
        if backend == "triton":
            if mod is None:
                raise RuntimeError("backend='triton' requested but triton is not installed")
            if not _triton_can_run(mod, x):
                raise RuntimeError(
                    "backend='triton' needs a CUDA tensor, or a CPU tensor with TRITON_INTERPRET=1 "
                    "set before vtprune.kernels.triton_compact is imported")
            use_triton = True
        else:
            use_triton = (mod is not None and (x.is_cuda or _interpret_env())
                          and _triton_can_run(mod, x))
        use_triton = use_triton and x.dtype in mod.SUPPORTED_DTYPES

    if use_triton:
        mod.compact_triton_(x, keep_index, dim, counts, pad_left)
    else:
        _compact_torch_(x, keep_index, dim, counts, pad_left)
    return x.narrow(dim, 0, K)
