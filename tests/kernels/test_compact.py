"""Tests for vtprune.kernels.compact_: Triton == torch == plain-indexing reference.

On CPU the Triton cases run under the interpreter (TRITON_INTERPRET=1, the default here). With a CUDA GPU,
run them compiled: ``TRITON_INTERPRET=0 python -m pytest tests/kernels`` (the cuda-parametrized cases need
real Triton; the interpreted CPU cases then skip). Every test taking ``device`` runs on cpu and, when
``torch.cuda.is_available()``, on cuda.
"""

import os

# Must precede the first import of the Triton kernel module (read at decoration time).
os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vtprune.kernels import compact as compact_mod  # noqa: E402
from vtprune.kernels import compact_, triton_available  # noqa: E402

HAS_TRITON = triton_available()
if HAS_TRITON:
    from vtprune.kernels import triton_compact

    TRITON_RUNS_ON_CPU = triton_compact.INTERPRETED
else:
    TRITON_RUNS_ON_CPU = False
needs_triton = pytest.mark.skipif(not TRITON_RUNS_ON_CPU,
                                  reason="needs triton imported with TRITON_INTERPRET=1")
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
needs_cuda_triton = pytest.mark.skipif(
    not (HAS_CUDA and HAS_TRITON and not TRITON_RUNS_ON_CPU),
    reason="needs a CUDA GPU and compiled triton (TRITON_INTERPRET=0)")
# Torch-path tests: cpu, and cuda when present. Triton tests: interpreted on cpu, compiled on cuda.
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
TRITON_DEVICES = [pytest.param("cpu", marks=needs_triton), pytest.param("cuda", marks=needs_cuda_triton)]

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


def on_device(t, device):
    """``t`` on ``device`` with the same sizes, strides and storage offset (a view of its moved base)."""
    if t is None or device == "cpu":
        return t
    if t._base is None:
        return t.to(device)
    return t._base.to(device).as_strided(t.size(), t.stride(), t.storage_offset())


def case_on(case, device):
    x, keep, dim, counts, pad_left = case
    return on_device(x, device), on_device(keep, device), dim, on_device(counts, device), pad_left


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

@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(case=cases(FLOATS + [torch.int64, torch.int32, torch.int8, torch.bool]))
def test_torch_matches_reference(device, case):
    run_and_check(*case_on(case, device), "torch")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@settings(max_examples=25, deadline=None)
@given(case=cases(FLOATS + [torch.int64, torch.int32, torch.float64]),
       tiles=st.sampled_from([(4096, 256), (8, 4), (4, 1)]))
def test_triton_matches_torch_and_reference(device, case, tiles):
    x, keep, dim, counts, pad_left = case_on(case, device)
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


@contextlib.contextmanager
def min_chunk_bytes(n):
    """Set the CPU torch path's chunk threshold (small: in-place chunks even for tiny rows)."""
    saved = compact_mod._MIN_CHUNK_BYTES
    compact_mod._MIN_CHUNK_BYTES = n
    try:
        yield
    finally:
        compact_mod._MIN_CHUNK_BYTES = saved


@settings(max_examples=80, deadline=None)
@given(case=cases(FLOATS + [torch.int64, torch.bool], layouts=("btd", "bhtd")),
       threshold=st.sampled_from([1, 8, 64, 10**9]))
def test_torch_chunked_moves_match_reference(case, threshold):
    # Tiny rows never reach the default 64 KiB threshold: lower it so the in-place chunks, the
    # temporary prefix and their mix all run.
    with min_chunk_bytes(threshold):
        run_and_check(*case, "torch")


# ----------------------------------------------------------------------------- specific cases

def test_plan_rows_hand_computed():
    keep = torch.tensor([[0, 1, 4, 7, 8, 12, 13, 19]])  # gaps keep[j] - j: 0 0 2 4 4 7 7 12
    full = torch.tensor([8])
    with min_chunk_bytes(64):  # 32-byte rows: a chunk needs >= 2 rows
        # rows 0, 1 in place; chunk [2, 4) reads 4, 7 >= 4; chunk [4, 8) reads 8.. >= 8
        assert compact_mod._plan_rows(keep, full, False, 32) == [(0, 8, 2, 2, [(2, 4), (4, 8)])]
    with min_chunk_bytes(96):  # 3 rows: row 2 (gap 2) goes through the temporary
        assert compact_mod._plan_rows(keep, full, False, 32) == [(0, 8, 2, 3, [(3, 7), (7, 8)])]
        # 16-byte rows, 6 needed: rows 2..4 via the temporary, one chunk from row 5 (gap 7), cut at 8
        assert compact_mod._plan_rows(keep, full, False, 16) == [(0, 8, 2, 5, [(5, 8)])]
        # 4-byte rows, 24 needed > K: the whole row via the temporary
        assert compact_mod._plan_rows(keep, full, False, 4) == [(0, 8, 0, 8, [])]
    # Left padding, K=10, 8 kept: shift 2, gaps -2 -2 0 2 2 5 5 10; the first three rows lie below
    # their slots (or on it after them), so they use the temporary; chunk [3, 5) reads 7, 8 >= 2 + 5.
    padded = torch.cat([keep, torch.tensor([[-3, 99]])], 1)
    with min_chunk_bytes(64):
        assert compact_mod._plan_rows(padded, full, True, 32) == [(2, 8, 0, 3, [(3, 5), (5, 8)])]


@pytest.mark.parametrize("threshold", [1, 10**9])
def test_torch_worst_cases(threshold):
    # One dropped token (gap 1 everywhere), a single far token, and left padding whose kept rows sit
    # below their slots: the chunks' edge cases, each against the reference.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, 6, generator=gen)
    keep = torch.stack([torch.arange(1, 40), torch.tensor([39] + [0] * 38), torch.arange(39)])
    counts = torch.tensor([39, 1, 20])
    with min_chunk_bytes(threshold):
        for pad_left in (False, True):
            run_and_check(x.clone(), keep, 1, counts, pad_left, "torch")
            run_and_check(x[:1].clone(), keep[:1], 1, None, pad_left, "torch")


def test_torch_path_keeps_autograd():
    # With a grad-requiring x the torch path must stay differentiable: d(sum of kept rows)/dx is 1 on
    # every kept source row and 0 elsewhere.
    leaf = torch.randn(2, 7, 3, requires_grad=True)
    keep = torch.tensor([[1, 4, 6], [0, 2, 3]])
    out = compact_(leaf * 1, keep, 1, backend="torch")
    out.sum().backward()
    expected = torch.zeros(2, 7, 3)
    for b in range(2):
        expected[b, keep[b]] = 1.0
    assert torch.equal(leaf.grad, expected)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_permuted_5d_uses_host_loop(device):
    # Middle dims (2, 3) do not coalesce after the permute: exercises the host loop.
    gen = torch.Generator().manual_seed(0)
    x = on_device(torch.randn(2, 9, 3, 2, 5, generator=gen).permute(0, 3, 2, 1, 4), device)  # [B, 2, 3, 9, 5]
    keep = torch.tensor([[1, 4, 8, -1], [0, 2, 3, 7]], device=device)
    counts = torch.tensor([3, 4], device=device)
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


@needs_cuda_triton
def test_auto_backend_picks_triton_on_cuda(monkeypatch):
    calls = []
    real = triton_compact.compact_triton_
    monkeypatch.setattr(triton_compact, "compact_triton_",
                        lambda *a, **k: (calls.append(a[0].device.type), real(*a, **k)))
    keep = torch.tensor([[0, 2]], device="cuda")
    out = compact_(torch.arange(12.0, device="cuda").view(1, 4, 3), keep, 1)
    assert calls == ["cuda"] and out.cpu().tolist() == [[[0.0, 1.0, 2.0], [6.0, 7.0, 8.0]]]
    compact_(torch.randn(1, 4, 3, device="cuda"), keep, 1, backend="torch")
    assert calls == ["cuda"]
    # A CPU tensor cannot reach the compiled kernel.
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        compact_(torch.randn(1, 4, 3), keep.cpu(), 1, backend="triton")


EDGE = [("torch", "cpu"), pytest.param("torch", "cuda", marks=needs_cuda),
        pytest.param("triton", "cpu", marks=needs_triton), pytest.param("triton", "cuda", marks=needs_cuda_triton)]


@pytest.mark.parametrize("backend,device", EDGE)
def test_edge_counts(backend, device):
    x = torch.arange(2 * 6 * 2, dtype=torch.float32, device=device).view(2, 6, 2)
    keep = torch.tensor([[1, 3, 5], [0, 0, 0]], device=device)
    counts = torch.tensor([3, 0], device=device)  # full row and empty row
    for pad_left in (False, True):
        run_and_check(x.clone(), keep, 1, counts, pad_left, backend)
    # K == 0 returns an empty view of x.
    out = compact_(x, torch.empty(2, 0, dtype=torch.long, device=device), 1, backend=backend)
    assert out.shape == (2, 0, 2)
    assert out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    # Identity keep leaves x unchanged.
    y = x.clone()
    compact_(y, torch.arange(6, device=device).expand(2, 6), 1, backend=backend)
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
    (dict(keep_index=torch.tensor([[5, 1], [0, 1]])), "out of range"),  # range error takes precedence
    # With counts < K only the first counts[b] entries are checked (the rest is junk).
    (dict(keep_index=torch.tensor([[0, 5], [0, 9]]), counts=torch.tensor([2, 1])), "out of range"),
    (dict(keep_index=torch.tensor([[2, 1], [0, -9]]), counts=torch.tensor([2, 1])), "strictly increasing"),
    (dict(dim=0), "batch axis"),
    (dict(dim=3), "out of range"),
    (dict(dim=-4), "out of range"),
    (dict(x=torch.zeros(5)), "batch dim"),
    (dict(x=torch.zeros(1, 5, 3).expand(2, 5, 3)), "overlapping"),
    (dict(backend="cuda"), "backend"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("kwargs,match", ERROR_CASES)
def test_errors(kwargs, match, backend, device):
    args = dict(x=_x(), keep_index=torch.tensor([[0, 1], [2, 4]]), dim=1, counts=None,
                backend=backend)
    args.update(kwargs)
    args = {k: on_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=match):
        compact_(**args)


@pytest.mark.parametrize("device", DEVICES)
def test_junk_after_counts_is_ignored(device):
    x = torch.arange(10.0, device=device).view(2, 5)
    out = compact_(x, torch.tensor([[4, -7, 99], [1, 3, 1]], device=device), 1,
                   counts=torch.tensor([1, 2], device=device))
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
