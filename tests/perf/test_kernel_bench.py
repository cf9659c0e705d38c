"""The compaction-kernel benchmark harness (vtprune.perf.kernel_bench): fields, formulas, the pre-timing
check and the output files. Tiny sizes, one repeat: no timing is asserted."""

import csv
import json

import pytest
import torch

from vtprune.perf import kernel_bench as KB

CPU_BACKENDS = ["torch", "index_select", "gather", "index_select_new", "copy"]
HIDDEN = KB.KernelCase("hidden", batch=2, tokens=16, keep=0.5, hidden=8)  # [2, 16, 8], K = 8
KV = KB.KernelCase("kv", batch=1, tokens=12, keep=0.25, heads=2, head_dim=4)  # [1, 2, 12, 4], K = 3


@pytest.fixture(scope="module")
def rows():
    return KB.run_kernel_bench("cpu", torch.float32, cases=[HIDDEN, KV], repeats=1, warmup=0)


def _row(rows, layout, backend):
    (row,) = [r for r in rows if r["layout"] == layout and r["backend"] == backend]
    return row


def test_rows_have_the_fields_and_every_cpu_candidate(rows):
    assert len(rows) == 2 * len(CPU_BACKENDS)
    for r in rows:
        assert set(KB.FIELDS) <= set(r)
        assert r["ok"] and r["error"] is None and r["ms"] > 0
        assert r["device"] == "cpu" and r["dtype"] == "float32"
    assert [r["backend"] for r in rows if r["layout"] == "hidden"] == CPU_BACKENDS
    h, kv = _row(rows, "hidden", "torch"), _row(rows, "kv", "torch")
    assert (h["shape"], h["kept"], h["keep"]) == ("2x16x8", 8, 0.5)
    assert (kv["shape"], kv["kept"]) == ("1x2x12x4", 3)  # round(0.25 * 12)


def test_moved_bytes_and_gbps_by_hand(rows):
    # hidden [2, 16, 8] fp32, K=8: 2 (read + write) * 8 rows * 32 bytes * 2 batch rows
    assert KB.moved_bytes((2, 16, 8), 1, 8, 4) == 1024
    # kv [1, 2, 12, 4] bf16, K=3: 2 * 3 rows * 8 bytes * (1 batch * 2 heads)
    assert KB.moved_bytes((1, 2, 12, 4), 2, 3, 2) == 96
    for r in rows:
        assert r["bytes_moved"] == (1024 if r["layout"] == "hidden" else 2 * 3 * 16 * 2)
        assert r["gbps"] == pytest.approx(r["bytes_moved"] / (r["ms"] * 1e-3) / 1e9)


def test_ratios_are_against_index_select_and_copy(rows):
    base, copy = _row(rows, "kv", "index_select"), _row(rows, "kv", "copy")
    assert base["speedup_vs_index_select"] == pytest.approx(1.0)
    assert copy["copy_fraction"] == pytest.approx(1.0)
    r = _row(rows, "kv", "gather")
    assert r["speedup_vs_index_select"] == pytest.approx(base["ms"] / r["ms"])
    assert r["copy_fraction"] == pytest.approx(copy["ms"] / r["ms"])


def test_peak_extra_memory_on_cpu(rows):
    buf = torch.zeros(4, 10, 6)
    assert KB._peak_extra_bytes(lambda b: b.clone(), buf) == buf.nbytes
    assert KB._peak_extra_bytes(lambda b: b.zero_(), buf) == 0
    # index_select into a new tensor allocates at least the kept rows: 8 * 8 * 4 bytes * 2 batch rows
    assert _row(rows, "hidden", "index_select")["peak_extra_bytes"] >= 512
    assert _row(rows, "hidden", "copy")["peak_extra_bytes"] == 0  # preallocated src / dst


def test_wrong_candidate_is_rejected_before_timing(monkeypatch):
    calls = []

    def lazy_compact(x, keep, dim, **kwargs):  # fast and wrong: moves nothing
        calls.append(kwargs.get("backend"))
        return x.narrow(dim, 0, keep.shape[1])

    monkeypatch.setattr(KB, "compact_", lazy_compact)
    rows = KB.run_kernel_bench("cpu", cases=[HIDDEN], repeats=3, warmup=2)
    bad = _row(rows, "hidden", "torch")
    assert not bad["ok"] and "differs" in bad["error"]
    assert bad["ms"] is None and bad["gbps"] is None and bad["speedup_vs_index_select"] is None
    assert calls == ["torch"]  # the check ran it once; it was never timed
    assert all(r["ok"] for r in rows if r["backend"] != "torch")
    assert "WRONG" in KB.kernel_table(rows)


def test_failing_candidate_is_reported(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel here")

    monkeypatch.setattr(KB, "compact_", broken)
    bad = _row(KB.run_kernel_bench("cpu", cases=[KV], repeats=1, warmup=0), "kv", "torch")
    assert not bad["ok"] and bad["error"] == "RuntimeError: no kernel here" and bad["ms"] is None


def test_write_kernel_results_files_parse(rows, tmp_path):
    paths = KB.write_kernel_results(rows, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["rows"] == rows and data["meta"]["fields"] == KB.FIELDS
    with paths["csv"].open(newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["backend"] for r in table] == [r["backend"] for r in rows]
    assert list(table[0]) == KB.FIELDS
    assert float(table[0]["ms"]) == pytest.approx(rows[0]["ms"])


def test_kernel_table_has_a_line_per_row(rows):
    lines = KB.kernel_table(rows).splitlines()
    assert len(lines) == 2 + len(rows) and lines[0].split()[:4] == ["layout", "shape", "keep", "backend"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="repeats"):
        KB.run_kernel_bench(cases=[HIDDEN], repeats=0)
    with pytest.raises(ValueError, match="unknown layout"):
        KB.run_kernel_bench(cases=[KB.KernelCase("bthd", 1, 4, 0.5)], repeats=1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            KB.run_kernel_bench("cuda", cases=[HIDDEN], repeats=1)


def test_default_cases():
    cpu, cuda = KB.default_cases("cpu"), KB.default_cases("cuda")
    assert {c.layout for c in cpu} == {c.layout for c in cuda} == {"hidden", "kv"}
    assert len(cuda) == 2 * 2 * 2 * 4 and {c.batch for c in cuda} == {1, 4}
    assert {c.tokens for c in cuda} == {632, 2936} and {c.keep for c in cuda} == {0.1, 0.25, 0.5, 0.9}
    assert KB.KernelCase("kv", 1, 632, 0.5).shape() == (1, 32, 632, 128)


def test_device_time_fields(monkeypatch):
    # The CUDA-only device timing, fed by a fake timer on CPU: 2 ms per call for every candidate.
    assert KB._device_timer("cpu") is None
    monkeypatch.setattr(KB, "_device_timer", lambda device: lambda fn, buf: (fn(buf), 2.0)[1])
    rows = KB.run_kernel_bench("cpu", cases=[HIDDEN], repeats=1, warmup=0)
    for r in rows:
        assert r["device_ms"] == 2.0 and r["device_copy_fraction"] == pytest.approx(1.0)
        assert r["device_gbps"] == pytest.approx(1024 / 2e-3 / 1e9)
    assert "dev ms" in KB.kernel_table(rows)


def test_kernel_only_candidate_compacts():
    # The CUDA benchmark's kernel-launch-only candidate, here through the Triton interpreter on CPU.
    pytest.importorskip("triton")
    from vtprune.kernels import triton_compact

    if not triton_compact.INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 for CPU tensors")
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    keep = torch.tensor([[1, 3], [0, 4]])
    out = KB._kernel_only(x, keep, 1)(x.clone())
    assert out.tolist() == [[[3.0, 4.0, 5.0], [9.0, 10.0, 11.0]], [[15.0, 16.0, 17.0], [27.0, 28.0, 29.0]]]
