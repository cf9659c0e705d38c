"""Benchmark of the in-place token compaction :func:`vtprune.kernels.compact_` against the out-of-place way.

Layouts: ``hidden`` = hidden states [B, T, D] (token axis 1) and ``kv`` = one KV-cache tensor [B, H, T, d]
(token axis 2). Each case keeps K = round(keep · T) tokens per batch row (a seeded random sorted subset,
different per row). Candidates, all ending with the kept rows at the front of x's token axis:

- ``triton`` (CUDA only) / ``torch``: ``compact_(x, keep, dim, backend=...)``, in place (the whole call:
  validation, host syncs and launch included);
- ``triton_kernel`` (CUDA only): the Triton kernel launch alone, the inputs validated once beforehand;
- ``index_select``: ``index_select`` of the kept rows into a new tensor (x viewed as [B·M·T, F] rows, one flat
  index), then ``copy_`` back into x: the usual out-of-place way;
- ``gather``: ``torch.gather`` along the token axis into a new tensor, then ``copy_`` back;
- ``index_select_new``: the same ``index_select`` without the copy back (a fresh tensor, not in place);
- ``copy``: ``dst.copy_(src)`` of exactly the kept bytes (preallocated tensors): the bandwidth ceiling.

Index tensors and the ``copy`` buffers are built once per case, outside the timed calls (this favours the
baselines: ``compact_`` times its own validation and index work).

Per row: median ms over ``repeats`` rounds after ``warmup`` rounds. Every round runs each candidate once, in an
order rotated round by round, so background load hits them alike; on CUDA each timed call is wrapped in
``torch.cuda.synchronize``. The in-place candidates keep compacting the same buffer from round to round: the
data change, the indices and so the memory traffic do not.

CUDA rows also carry ``device_ms``: the median CUDA-event time of one call, with the GPU held busy
(``torch.cuda._sleep``) while the host enqueues it, so launch latency and host work that does not wait for
the GPU stay outside; a call that synchronizes inside (``compact_``'s validation does) includes what
follows its sync. At LLaVA sizes an H200 moves the kept rows in microseconds, comparable to the launch
latency, so ``device_*`` is the bandwidth figure and ``ms`` what a caller waits.

``gbps`` = bytes moved / time, bytes moved = 2 · K · row_bytes · (B · M): every kept row read once and written
once, with row_bytes = F · element size, M = the product of the dims between batch and token axis (H for
``kv``, 1 for ``hidden``) and F = the product of the dims after it (D or d). ``speedup_vs_index_select`` =
index_select ms / ms (> 1: faster); ``copy_fraction`` = copy ms / ms (the fraction of the copy bandwidth);
``device_gbps`` and ``device_copy_fraction`` the same from ``device_ms``.

``peak_extra_bytes``: memory a candidate allocates beyond its inputs during one call. CUDA: the rise of
``torch.cuda.max_memory_allocated`` over the allocated bytes before the call. CPU: measured with
``torch.profiler`` (``profile_memory=True``): the running sum of every op's own allocations minus frees, in
start order, at its maximum (a temporary allocated and freed inside one aten op is not seen).

Before any timing, each candidate runs once on a fresh copy and its result must equal the reference (per-row
``index_select`` of the original tensor) exactly; a candidate that differs is reported with ``ok=False`` and
no timings, never timed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..kernels import compact_, triton_available
from .timing import synchronize

__all__ = ["KernelCase", "default_cases", "moved_bytes", "run_kernel_bench", "kernel_table",
           "write_kernel_results", "main"]

LAYOUTS = ("hidden", "kv")
KEEPS = (0.1, 0.25, 0.5, 0.9)
LLAVA_T, NEXT_T = 632, 2936  # LLaVA-1.5: 576 visual + 56 text tokens; NeXT anyres: 5 x 576 + 56
FIELDS = ["layout", "shape", "batch", "tokens", "kept", "keep", "dtype", "device", "backend", "ok", "error",
          "ms", "gbps", "bytes_moved", "speedup_vs_index_select", "copy_fraction", "device_ms", "device_gbps",
          "device_copy_fraction", "peak_extra_bytes"]
# ~0.5 ms of GPU spin before each device-timed call: longer than the host needs to enqueue the call.
_SLEEP_CYCLES = 1_000_000


@dataclass(frozen=True)
class KernelCase:
    """One benchmark case: layout ``hidden`` ([B, T, D]) or ``kv`` ([B, H, T, d]), keep = fraction of T kept."""

    layout: str
    batch: int
    tokens: int
    keep: float
    hidden: int = 4096  # D of ``hidden``
    heads: int = 32  # H of ``kv``
    head_dim: int = 128  # d of ``kv``

    def shape(self) -> tuple[int, ...]:
        if self.layout == "hidden":
            return (self.batch, self.tokens, self.hidden)
        if self.layout == "kv":
            return (self.batch, self.heads, self.tokens, self.head_dim)
        raise ValueError(f"unknown layout {self.layout!r}; use one of {LAYOUTS}")

    @property
    def dim(self) -> int:
        return 1 if self.layout == "hidden" else 2

    @property
    def kept(self) -> int:
        return max(1, min(self.tokens, round(self.keep * self.tokens)))


def default_cases(device: str = "cpu") -> list[KernelCase]:
    """LLaVA-1.5-7B-like sizes (T=632, D=4096, H=32, d=128). CUDA: B in {1, 4} x T in {632, 2936} x every
    keep; CPU: a small set (B=1, T=632 at every keep, plus B=4 and the NeXT length once each per layout)."""
    if torch.device(device).type == "cuda":
        return [KernelCase(lay, b, t, k) for lay in LAYOUTS for b in (1, 4) for t in (LLAVA_T, NEXT_T)
                for k in KEEPS]
    cases = [KernelCase(lay, 1, LLAVA_T, k) for lay in LAYOUTS for k in KEEPS]
    return cases + [KernelCase(lay, b, t, 0.5) for lay in LAYOUTS for b, t in ((4, LLAVA_T), (1, NEXT_T))]


def moved_bytes(shape, dim: int, kept: int, element_size: int) -> int:
    """Bytes read + written when moving the kept rows: 2 · K · row_bytes · (B · M), row_bytes = F · element
    size, M = prod(shape[1:dim]), F = prod(shape[dim + 1:])."""
    outer = 1
    for n in shape[:dim]:
        outer *= n
    row = element_size
    for n in shape[dim + 1:]:
        row *= n
    return 2 * kept * row * outer


# ------------------------------------------------------------------------------------------------------------
# candidates
def _keep_index(case: KernelCase, device, seed: int) -> torch.Tensor:
    """[B, K] int64: a sorted random subset of range(T) per batch row, seeded."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(case.tokens, generator=gen)[:case.kept].sort().values for _ in range(case.batch)]
    return torch.stack(rows).to(device)


def _reference(x: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """The kept rows of the untouched x, one ``index_select`` per batch row: [.., K, ..]."""
    return torch.stack([x[b].index_select(dim - 1, keep[b]) for b in range(x.shape[0])])


def _candidates(x: torch.Tensor, keep: torch.Tensor, dim: int):
    """(name -> fn(buffer), (src, dst) of ``copy``) for one case; each fn returns its result tensor (the
    in-place ones: the view of buffer). Precomputed indices / buffers live in the closures, untimed."""
    B, K = keep.shape
    shape, T = tuple(x.shape), x.shape[dim]
    M = 1
    for n in shape[1:dim]:
        M *= n
    F = x.numel() // (B * M * T) if x.numel() else 0
    out_shape = shape[:dim] + (K,) + shape[dim + 1:]
    # Flat row index into x viewed as [B·M·T, F]: row (b, m, t) = (b·M + m)·T + t.
    base = torch.arange(B * M, device=x.device).view(B, M, 1) * T
    flat = (keep[:, None, :] + base).reshape(-1)
    gather_idx = keep.view((B,) + (1,) * (dim - 1) + (K,) + (1,) * (x.ndim - dim - 1)).expand(out_shape)
    src = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    dst = torch.empty_like(src)

    def index_select_new(buf):
        return buf.reshape(B * M * T, F).index_select(0, flat).view(out_shape)

    def index_select(buf):
        return buf.narrow(dim, 0, K).copy_(index_select_new(buf))

    def gather(buf):
        return buf.narrow(dim, 0, K).copy_(torch.gather(buf, dim, gather_idx))

    cands = {}
    if x.is_cuda and triton_available():
        cands["triton"] = lambda buf: compact_(buf, keep, dim, backend="triton")
        cands["triton_kernel"] = _kernel_only(x, keep, dim)
    cands["torch"] = lambda buf: compact_(buf, keep, dim, backend="torch")
    cands.update(index_select=index_select, gather=gather, index_select_new=index_select_new)
    cands["copy"] = lambda buf: dst.copy_(src)
    return cands, (src, dst)


def _kernel_only(x: torch.Tensor, keep: torch.Tensor, dim: int):
    """The Triton kernel launch alone: ``compact_``'s validation done once here, outside the timed call."""
    from ..kernels import compact as compact_mod
    from ..kernels import triton_compact

    dim, keep, counts = compact_mod._validate(x, keep, dim, None)
    K = keep.shape[1]

    def run(buf):
        triton_compact.compact_triton_(buf, keep, dim, counts, False)
        return buf.narrow(dim, 0, K)

    return run


def _verify(fn, x: torch.Tensor, ref: torch.Tensor, copy_of=None) -> str | None:
    """Run ``fn`` once on a fresh copy of x; returns why its result is wrong, or None. ``copy_of`` = (src, dst):
    ``fn`` is the plain copy, checked as one (dst must equal src afterwards)."""
    try:
        if copy_of is not None:
            src, dst = copy_of
            src.copy_(ref)
            dst.zero_()
            fn(x.clone())
            return None if torch.equal(dst, src) else "copy result differs from its source"
        out = fn(x.clone())
    except Exception as err:  # a candidate that cannot run is reported, not timed
        return f"{type(err).__name__}: {err}"
    if tuple(out.shape) != tuple(ref.shape):
        return f"result shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if not torch.equal(out, ref):
        return "result differs from the index_select reference"
    return None


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ side prints a start/stop line per use)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _peak_extra_bytes(fn, buf: torch.Tensor) -> int | None:
    """Memory one call of ``fn(buf)`` allocates beyond what exists before it (see the module docstring)."""
    if buf.is_cuda:
        synchronize(buf.device)
        before = torch.cuda.memory_allocated(buf.device)
        torch.cuda.reset_peak_memory_stats(buf.device)
        out = fn(buf)
        synchronize(buf.device)
        peak = torch.cuda.max_memory_allocated(buf.device)
        del out
        return max(0, int(peak - before))
    if buf.device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(buf)
        del out
    level = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        level += event.self_cpu_memory_usage
        peak = max(peak, level)
    return int(peak)


def _device_timer(device):
    """CUDA: fn -> device ms of one call, from CUDA events with the GPU held busy (``torch.cuda._sleep``)
    while the host enqueues the call, so launch latency stays outside the events; None elsewhere."""
    if torch.device(device).type != "cuda":
        return None
    sleep = getattr(torch.cuda, "_sleep", None)

    def timed(fn, buf) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        if sleep is not None:
            sleep(_SLEEP_CYCLES)
        start.record()
        fn(buf)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    return timed


def _time_interleaved(fns: dict, bufs: dict, device, warmup: int, repeats: int) -> dict[str, tuple]:
    """name -> (median wall ms, median device ms or None). Each round runs every candidate once (twice on
    CUDA: wall, then device time), the order rotated by one per round."""
    names = list(fns)
    wall = {n: [] for n in names}
    dev = {n: [] for n in names}
    timer = _device_timer(device)
    for rnd in range(warmup + repeats):
        k = rnd % len(names)
        for name in names[k:] + names[:k]:
            synchronize(device)
            t0 = time.perf_counter()
            fns[name](bufs[name])
            synchronize(device)
            t1 = time.perf_counter()
            d = timer(fns[name], bufs[name]) if timer is not None else None
            if rnd >= warmup:
                wall[name].append((t1 - t0) * 1000.0)
                if d is not None:
                    dev[name].append(d)
    return {n: (statistics.median(wall[n]), statistics.median(dev[n]) if dev[n] else None) for n in names}


def _ratio(num, den):
    return num / den if num and den else None


def _bench_case(case: KernelCase, device, dtype, repeats: int, warmup: int, seed: int) -> list[dict]:
    shape, dim = case.shape(), case.dim
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    keep = _keep_index(case, device, seed)
    ref = _reference(x, keep, dim)
    fns, copy_bufs = _candidates(x, keep, dim)
    errors = {name: _verify(fn, x, ref, copy_bufs if name == "copy" else None) for name, fn in fns.items()}
    good = {n: fn for n, fn in fns.items() if errors[n] is None}
    bufs = {n: x.clone() for n in good}
    peaks = {n: _peak_extra_bytes(fn, bufs[n]) for n, fn in good.items()}
    ms = _time_interleaved(good, bufs, device, warmup, repeats) if good else {}
    nbytes = moved_bytes(shape, dim, case.kept, x.element_size())
    base, copy = ms.get("index_select", (None, None)), ms.get("copy", (None, None))
    rows = []
    for name in fns:
        wall, dev = ms.get(name, (None, None))
        rows.append({
            "layout": case.layout, "shape": "x".join(map(str, shape)), "batch": case.batch, "tokens": case.tokens,
            "kept": case.kept, "keep": case.keep, "dtype": str(dtype).replace("torch.", ""),
            "device": str(device), "backend": name, "ok": errors[name] is None, "error": errors[name],
            "ms": wall, "gbps": _ratio(nbytes, wall and wall * 1e6), "bytes_moved": nbytes,
            "speedup_vs_index_select": _ratio(base[0], wall), "copy_fraction": _ratio(copy[0], wall),
            "device_ms": dev, "device_gbps": _ratio(nbytes, dev and dev * 1e6),
            "device_copy_fraction": _ratio(copy[1], dev),
            "peak_extra_bytes": peaks.get(name),
        })
    return rows


def run_kernel_bench(device="cpu", dtype=torch.float32, cases=None, repeats: int = 20, warmup: int = 3,
                     seed: int = 0, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Benchmark every candidate on every case (default: :func:`default_cases` for ``device``); returns one
    dict per (case, candidate) with the fields of :data:`FIELDS` (see the module docstring)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use device='cpu'")
    rows = []
    for i, case in enumerate(default_cases(str(device)) if cases is None else cases):
        case.shape()  # an unknown layout fails here, before any work
        if progress is not None:
            progress(f"[{i + 1}] {case.layout} {'x'.join(map(str, case.shape()))} keep {case.keep}")
        rows += _bench_case(case, device, dtype, repeats, warmup, seed + i)
    return rows


# ------------------------------------------------------------------------------------------------------------
# output
def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def kernel_table(rows: list[dict]) -> str:
    """A compact text table: one line per (case, candidate); CUDA rows add the device-time columns."""
    dev = any(r.get("device_ms") is not None for r in rows)
    head = (f"{'layout':<6} {'shape':<16} {'keep':>4} {'backend':<16} {'ms':>8} {'GB/s':>7} "
            f"{'vs idxsel':>9} {'of copy':>7}" + (f" {'dev ms':>8} {'dev GB/s':>8} {'of copy':>7}" if dev else "")
            + f" {'extra MiB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        extra = None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / 2**20
        line = (f"{r['layout']:<6} {r['shape']:<16} {r['keep']:>4} {r['backend']:<16} "
                f"{(_fmt(r['ms'], '.3f') if r['ok'] else 'WRONG'):>8} {_fmt(r['gbps'], '.1f'):>7} "
                f"{_fmt(r['speedup_vs_index_select'], '.2f'):>9} {_pct(r['copy_fraction']):>7}")
        if dev:
            line += (f" {_fmt(r.get('device_ms'), '.4f'):>8} {_fmt(r.get('device_gbps'), '.0f'):>8} "
                     f"{_pct(r.get('device_copy_fraction')):>7}")
        lines.append(line + f" {_fmt(extra, '.2f'):>9}")
    for r in rows:
        if not r["ok"]:
            lines.append(f"WRONG {r['backend']} on {r['layout']} {r['shape']} keep {r['keep']}: {r['error']}")
    return "\n".join(lines)


def _meta(rows: list[dict]) -> dict:
    cuda = any(str(r["device"]).startswith("cuda") for r in rows)
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if cuda and torch.cuda.is_available() else None,
            "bytes_moved": "2 * K * row_bytes * (B * M)", "fields": FIELDS}


def write_kernel_results(rows: list[dict], out_dir) -> dict[str, Path]:
    """``kernel.json`` ({"meta": ..., "rows": [...]}) and ``kernel.csv`` (one line per row) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "kernel.json", "csv": out / "kernel.csv"}
    paths["json"].write_text(json.dumps({"meta": _meta(rows), "rows": rows}, indent=1) + "\n", encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return paths


def main(argv=None, prog: str = "python -m vtprune.perf.kernel_bench") -> int:
    """``python -m vtprune.perf.kernel_bench [--device cuda] [--dtype bfloat16] [--out DIR]`` (``prog``: the
    name usage lines show; the old ``vtprune.benchmarks.kernel_bench`` path passes its own)."""
    p = argparse.ArgumentParser(prog=prog,
                                description="Benchmark vtprune.kernels.compact_ against index_select / gather "
                                            "+ copy back and a plain copy of the kept bytes.")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", help="folder for kernel.json and kernel.csv (default: print only)")
    args = p.parse_args(argv)
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
              "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if args.dtype not in dtypes:
        p.error(f"--dtype {args.dtype}: use float32, float16 or bfloat16")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rows = run_kernel_bench(args.device, dtypes[args.dtype], repeats=args.repeats, warmup=args.warmup,
                                progress=lambda s: print(s, file=sys.stderr, flush=True))
    except (ValueError, RuntimeError) as err:
        print(f"kernel_bench: {err}", file=sys.stderr)
        return 2
    print(kernel_table(rows))
    if args.out:
        paths = write_kernel_results(rows, args.out)
        print(f"wrote {paths['json']} and {paths['csv']}", file=sys.stderr)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
