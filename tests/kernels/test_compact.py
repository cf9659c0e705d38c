"""Tests for vtprune.kernels.compact_: Triton (interpreted on CPU) == torch == plain-indexing reference."""

import os

# Must precede the first import of the Triton kernel module (read at decoration time).
os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vtprune.kernels import compact_, triton_available  # noqa: E402

HAS_TRITON = triton_available()
if HAS_TRITON:
    from vtprune.kernels import triton_compact

    TRITON_RUNS_ON_CPU = triton_compact.INTERPRETED
else:
    TRITON_RUNS_ON_CPU = False
needs_triton = pytest.mark.skipif(not TRITON_RUNS_ON_CPU,
                                  reason="needs triton imported with TRITON_INTERPRET=1")

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------- helpers

def reference(x, keep, dim, counts, pad_left):
    """Expected x.narrow(dim, 0, K) after compaction, built with plain per-row indexing."""
    B, K = keep.shape
    out = torch.zeros_like(x.narrow(dim, 0, K))
    for b in range(B):
        c = K if counts is None else int(counts[b])
        shift = K - c if pad_left else 0
        for j in range(c):
            out[b].select(dim - 1, j + shift).copy_(x[b].select(dim - 1, int(keep[b, j])))
    return out


def make_x(layout, B, T, H, D, dtype, strides, gen):
    """Build x in `layout` ('bt', 'btd', 'bhtd') with the requested memory `strides`; returns (x, dim)."""
    def rand(*shape):
        if dtype.is_floating_point:
            return torch.randn(*shape, generator=gen).to(dtype)
        if dtype == torch.bool:
            return torch.rand(*shape, generator=gen) < 0.5
        return torch.randint(-1000, 1000, shape, generator=gen).to(dtype)

    if layout == "bt":
        shape, dim = (B, T), 1
    elif layout == "btd":
        shape, dim = (B, T, D), 1
    else:
        shape, dim = (B, H, T, D), 2

    if strides == "contig":
        x = rand(*shape)
    elif strides == "transposed":
        if layout == "bhtd":  # KV cache from [B, T, H, d].transpose(1, 2)
            x = rand(B, T, H, D).transpose(1, 2)
        else:  # token axis is the last in memory
            x = rand(*reversed(shape[1:]), B).permute(-1, *range(len(shape) - 2, -1, -1))
    else:  # "sliced": a strided window of a bigger tensor (offset, step 2 on the last dim)
        big = rand(*[n + 1 for n in shape[:-1]], 2 * shape[-1] + 1)
        x = big[tuple(slice(1, None) for _ in shape[:-1]) + (slice(1, None, 2),)]
    assert tuple(x.shape) == shape
    return x, dim


@st.composite
def cases(draw, dtypes, layouts=("bt", "btd", "bhtd")):
    layout = draw(st.sampled_from(layouts))
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 24))
    K = draw(st.integers(0, T))
    H = draw(st.integers(1, 3))
    D = draw(st.integers(1, 20))
    dtype = draw(st.sampled_from(dtypes))
    strides = draw(st.sampled_from(["contig", "transposed", "sliced"]))
    pad_left = draw(st.booleans())
    neg_dim = draw(st.booleans())
    use_counts = draw(st.booleans())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    x, dim = make_x(layout, B, T, H, D, dtype, strides, gen)
    counts = torch.randint(0, K + 1, (B,), generator=gen) if use_counts else None
    keep = torch.full((B, K), -1, dtype=torch.int64)
    for b in range(B):
        c = K if counts is None else int(counts[b])
        keep[b, :c] = torch.randperm(T, generator=gen)[:c].sort().values
        # Entries past counts[b] are ignored: fill with junk, not only -1.
        keep[b, c:] = torch.randint(-5, T + 5, (K - c,), generator=gen)
    keep = keep.to(draw(st.sampled_from([torch.int64, torch.int32])))
    return x, keep, (dim - x.ndim if neg_dim else dim), counts, pad_left


def run_and_check(x, keep, dim, counts, pad_left, backend):
    expected = reference(x.clone(), keep, dim % x.ndim, counts, pad_left)
    before_ptr, before_stride = x.data_ptr(), x.stride()
    out = compact_(x, keep, dim, counts=counts, pad_left=pad_left, backend=backend)
    # The result is a view into x's own storage, and x itself was modified.
    assert out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert x.stride() == before_stride and (out.numel() == 0 or out.data_ptr() == before_ptr)
    assert torch.equal(out, expected)
    assert torch.equal(x.narrow(dim, 0, keep.shape[1]), expected)
    return out


# ----------------------------------------------------------------------------- property tests

@settings(max_examples=60, deadline=None)
@given(cases(FLOATS + [torch.int64, torch.int32, torch.int8, torch.bool]))
def test_torch_matches_reference(case):
    x, keep, dim, counts, pad_left = case
    run_and_check(x, keep, dim, counts, pad_left, "torch")


@needs_triton
@settings(max_examples=25, deadline=None)
@given(cases(FLOATS + [torch.int64, torch.int32, torch.float64]),
       st.sampled_from([(4096, 256), (8, 4), (4, 1)]))
def test_triton_matches_torch_and_reference(case, tiles):
    x, keep, dim, counts, pad_left = case
    x_torch = x.clone()
    # Small tiles force several row tiles and column blocks per program/grid.
    saved = triton_compact._TILE_ELEMS, triton_compact._MAX_BLOCK_C
    triton_compact._TILE_ELEMS, triton_compact._MAX_BLOCK_C = tiles
    try:
        out = run_and_check(x, keep, dim, counts, pad_left, "triton")
    finally:
        triton_compact._TILE_ELEMS, triton_compact._MAX_BLOCK_C = saved
    assert torch.equal(out, compact_(x_torch, keep, dim, counts=counts, pad_left=pad_left,
                                     backend="torch"))


# ----------------------------------------------------------------------------- specific cases

@needs_triton
def test_triton_permuted_5d_uses_host_loop():
    # Middle dims (2, 3) do not coalesce after the permute: exercises the host loop.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 3, 2, 5, generator=gen).permute(0, 3, 2, 1, 4)  # [B, 2, 3, T=9, 5]
    keep = torch.tensor([[1, 4, 8, -1], [0, 2, 3, 7]])
    counts = torch.tensor([3, 4])
    for pad_left in (False, True):
        y = x.clone()  # clone keeps the permuted strides
        assert y.stride() == x.stride()
        run_and_check(y, keep, 3, counts, pad_left, "triton")


@needs_triton
def test_auto_backend_picks_triton_under_interpreter(monkeypatch):
    calls = []
    real = triton_compact.compact_triton_
    monkeypatch.setattr(triton_compact, "compact_triton_",
                        lambda *a, **k: (calls.append(a[0].dtype), real(*a, **k)))
    keep = torch.tensor([[0, 2]])
    compact_(torch.randn(1, 4, 3), keep, 1)
    assert calls == [torch.float32]
    # Dtypes the kernel does not take fall back to torch, even when forced.
    x = torch.tensor([[True, False, True, True]])
    out = compact_(x, keep, 1, backend="triton")
    assert calls == [torch.float32] and out.tolist() == [[True, True]]
    compact_(torch.randn(1, 4, 3), keep, 1, backend="torch")
    assert len(calls) == 1


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_edge_counts(backend):
    x = torch.arange(2 * 6 * 2, dtype=torch.float32).view(2, 6, 2)
    keep = torch.tensor([[1, 3, 5], [0, 0, 0]])
    counts = torch.tensor([3, 0])  # full row and empty row
    for pad_left in (False, True):
        run_and_check(x.clone(), keep, 1, counts, pad_left, backend)
    # K == 0 returns an empty view of x.
    out = compact_(x, torch.empty(2, 0, dtype=torch.long), 1, backend=backend)
    assert out.shape == (2, 0, 2)
    assert out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    # Identity keep leaves x unchanged.
    y = x.clone()
    compact_(y, torch.arange(6).expand(2, 6), 1, backend=backend)
    assert torch.equal(y, x)


# ----------------------------------------------------------------------------- errors

def _x():
    return torch.zeros(2, 5, 3)


ERROR_CASES = [
    (dict(keep_index=torch.tensor([0, 1])), "shape"),
    (dict(keep_index=torch.tensor([[0, 1]])), "B=2"),
    (dict(keep_index=torch.arange(6).expand(2, 6)), "K=6"),
    (dict(keep_index=torch.tensor([[0.0], [1.0]])), "int64 or int32"),
    (dict(counts=torch.tensor([1, 3])), "counts out of range"),
    (dict(counts=torch.tensor([-1, 1])), "counts out of range"),
    (dict(counts=torch.tensor([1])), "counts must have shape"),
    (dict(counts=torch.tensor([1.0, 1.0])), "counts must be an integer"),
    (dict(keep_index=torch.tensor([[0, 5], [0, 1]])), "out of range"),
    (dict(keep_index=torch.tensor([[-1, 2], [0, 1]])), "out of range"),
    (dict(keep_index=torch.tensor([[2, 1], [0, 1]])), "strictly increasing"),
    (dict(keep_index=torch.tensor([[1, 1], [0, 1]])), "strictly increasing"),
    (dict(dim=0), "batch axis"),
    (dict(dim=3), "out of range"),
    (dict(dim=-4), "out of range"),
    (dict(x=torch.zeros(5)), "batch dim"),
    (dict(x=torch.zeros(1, 5, 3).expand(2, 5, 3)), "overlapping"),
    (dict(backend="cuda"), "backend"),
]


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("kwargs,match", ERROR_CASES)
def test_errors(kwargs, match, backend):
    args = dict(x=_x(), keep_index=torch.tensor([[0, 1], [2, 4]]), dim=1, counts=None,
                backend=backend)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        compact_(**args)


def test_junk_after_counts_is_ignored():
    x = torch.arange(10.0).view(2, 5)
    out = compact_(x, torch.tensor([[4, -7, 99], [1, 3, 1]]), 1, counts=torch.tensor([1, 2]))
    assert out.tolist() == [[4.0, 0.0, 0.0], [6.0, 8.0, 0.0]]


def test_package_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, vtprune.kernels as k\n"
            "assert not k.triton_available()\n"
            "x = torch.arange(6.0).view(1, 6)\n"
            "assert k.compact_(x, torch.tensor([[1, 4]]), 1).tolist() == [[1.0, 4.0]]\n"
            "assert 'vtprune.kernels.triton_compact' not in sys.modules\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
