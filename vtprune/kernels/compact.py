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
with zeros in the same sweep.

The torch path does the same work with a temporary gather (advanced indexing
into a [B, K, ...] copy) followed by ``copy_`` back into x's storage. The
temporary makes ordering irrelevant; it costs one extra [B, K, ...] buffer,
which is fine on CPU and as a fallback.
"""

from __future__ import annotations

import os

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


def _validate(x, keep_index, dim, counts):
    """Check shapes/ranges; returns (dim >= 1, keep_index on x.device, counts [B] int64 on x.device)."""
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
    B, T = x.shape[0], x.shape[dim]

    if not isinstance(keep_index, torch.Tensor) or keep_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"keep_index must be an int64 or int32 tensor, got "
                         f"{getattr(keep_index, 'dtype', type(keep_index).__name__)}")
    if keep_index.ndim != 2 or keep_index.shape[0] != B:
        raise ValueError(f"keep_index must have shape [B, K] with B={B}, got {tuple(keep_index.shape)}")
    K = keep_index.shape[1]
    if K > T:
        raise ValueError(f"keep_index keeps K={K} tokens but the token axis (dim {dim}) has only T={T}")
    keep_index = keep_index.to(x.device)

    if counts is None:
        counts = torch.full((B,), K, dtype=torch.int64, device=x.device)
    else:
        if not isinstance(counts, torch.Tensor) or counts.dtype.is_floating_point \
                or counts.dtype == torch.bool or counts.is_complex():
            raise ValueError("counts must be an integer tensor of shape [B]")
        if tuple(counts.shape) != (B,):
            raise ValueError(f"counts must have shape [B]=({B},), got {tuple(counts.shape)}")
        counts = counts.to(device=x.device, dtype=torch.int64).contiguous()
        if B and bool(((counts < 0) | (counts > K)).any()):
            raise ValueError(f"counts out of range: every count must be in [0, K={K}], got "
                             f"{counts.tolist() if B <= 16 else 'values outside'}")

    if B and K:
        # Only the first counts[b] entries of each row are meaningful.
        valid = torch.arange(K, device=x.device) < counts[:, None]
        idx = keep_index.long()
        if bool((valid & ((idx < 0) | (idx >= T))).any()):
            raise ValueError(f"keep_index out of range: kept indices must lie in [0, T={T})")
        if K > 1 and bool((valid[:, 1:] & (idx[:, 1:] <= idx[:, :-1])).any()):
            raise ValueError("keep_index must be strictly increasing within the first counts[b] "
                             "entries of each row (sorted, unique)")
    return dim, keep_index, counts


def _compact_torch_(x, keep_index, dim, counts, pad_left):
    """Torch path: gather into a temporary [B, K, ...], zero the padding, copy_ into x's rows [0, K)."""
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
