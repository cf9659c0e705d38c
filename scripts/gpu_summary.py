"""The short table that ends ``scripts/gpu_check.sh``: kernel bandwidth and the keep-64 prefill targets.

    python scripts/gpu_summary.py --kernel OUT/kernel/kernel.json --perf OUT/perf/results.json

From ``kernel.json`` (``vtprune.benchmarks.kernel_bench``): per layout, the Triton compaction's fraction of the
plain-copy bandwidth for the same bytes (``device_copy_fraction`` of the ``triton_kernel`` rows: copy device ms /
kernel device ms), median and worst over the cases, target: median >= 80%; and the whole ``compact_`` call's
wall-time fraction and speed-up over index_select + copy back, for the host overhead. From ``results.json``
(``vtprune perf``): the keep-64 configurations' speed-up, oracle fraction (methods; target >= 95%) and ideal
fraction (the oracle's; target >= 85%).

Exit status: 0 all targets met, 3 a target missed (or a candidate was wrong), 2 an input missing or unreadable.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

COPY_TARGET, ORACLE_TARGET, IDEAL_TARGET = 0.80, 0.95, 0.85


def _load(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        print(f"{what}: {path} not found (did its step fail?)")
    except (OSError, ValueError) as err:
        print(f"{what}: cannot read {path}: {err}")
    return None


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISS"


def _bandwidth_rows(rows: list[dict]) -> tuple[list[dict], str, str]:
    """(rows, fraction field, what): the kernel launch alone in device time, else the whole compact_ call."""
    for backend, field, what in (("triton_kernel", "device_copy_fraction", "kernel, device time"),
                                 ("triton", "device_copy_fraction", "compact_ call, device time"),
                                 ("triton", "copy_fraction", "compact_ call, wall time")):
        sel = [r for r in rows if r.get("backend") == backend and r.get(field) is not None]
        if sel:
            return sel, field, what
    return [], "", ""


def kernel_lines(data) -> tuple[list[str], bool]:
    """Lines for the kernel part, and whether its targets are met."""
    rows = data.get("rows", []) if isinstance(data, dict) else data
    wrong = [f"  WRONG {r['backend']} on {r['layout']} {r['shape']} keep {r['keep']}: {r['error']}"
             for r in rows if not r.get("ok", True)]
    sel, field, what = _bandwidth_rows(rows)
    if not sel:
        return ["  no triton rows with a copy fraction (was the benchmark run on cuda?)"] + wrong, False
    calls = {r["layout"]: [] for r in rows}
    for r in rows:
        if r.get("backend") == "triton" and r.get("copy_fraction") is not None:
            calls[r["layout"]].append(r)
    head = (f"  {'layout':<7} {'cases':>5} {'median':>7} {'worst (case)':<34} {'call':>6} {'call vs idxsel':>14}"
            f"  target median >= {COPY_TARGET:.0%}")
    lines = [f"  Triton share of the copy bandwidth ({what}); 'call' = the whole compact_ call in wall time", head]
    ok = not wrong
    for layout in sorted({r["layout"] for r in sel}):
        mine = [r for r in sel if r["layout"] == layout]
        med = statistics.median(r[field] for r in mine)
        worst = min(mine, key=lambda r: r[field])
        worst_txt = f"{_pct(worst[field])} ({worst['shape']} keep {worst['keep']})"
        call = calls.get(layout) or []
        call_frac = _pct(statistics.median(r["copy_fraction"] for r in call)) if call else "-"
        speed = [r["speedup_vs_index_select"] for r in call if r.get("speedup_vs_index_select")]
        speed_txt = f"{statistics.median(speed):.2f}x" if speed else "-"
        lines.append(f"  {layout:<7} {len(mine):>5} {_pct(med):>7} {worst_txt:<34} {call_frac:>6} {speed_txt:>14}"
                     f"  {_mark(med >= COPY_TARGET)}")
        ok = ok and med >= COPY_TARGET
    return lines + wrong, ok


def _records(data) -> list[dict]:
    if isinstance(data, list):
        return data
    for key in ("results", "records", "rows"):
        if isinstance(data.get(key), list):
            return data[key]
    return []


def perf_lines(data, keep: int = 64) -> tuple[list[str], bool]:
    """Lines for the keep-``keep`` configurations of ``vtprune perf``, and whether the targets are met."""
    rows = [r for r in _records(data) if r.get("keep") == keep and r.get("kind", "method") != "replay"]
    if not rows:
        return [f"  no keep-{keep} records in results.json"], False
    head = (f"  {'configuration':<28} {'prefill ms':>10} {'speed-up':>8} {'oracle %':>9} {'ideal %':>8} "
            f"{'overhead':>8}  target")
    lines = [head]
    ok = True
    for r in rows:
        label = r.get("label") or r.get("name", "?")
        is_oracle = r.get("kind") == "oracle" or str(r.get("name", "")).startswith("oracle")
        if r.get("error"):
            lines.append(f"  {label:<28} failed: {r['error']}")
            ok = False
            continue
        if is_oracle:
            value, target, what = r.get("ideal_fraction"), IDEAL_TARGET, "ideal"
        else:
            value, target, what = r.get("oracle_fraction"), ORACLE_TARGET, "oracle"
        met = value is not None and value >= target
        ok = ok and met
        ms, speed = r.get("prefill_ms"), r.get("speedup")
        lines.append(f"  {label:<28} {('-' if ms is None else f'{ms:.1f}'):>10} "
                     f"{('-' if speed is None else f'{speed:.2f}x'):>8} {_pct(r.get('oracle_fraction')):>9} "
                     f"{_pct(r.get('ideal_fraction')):>8} {_pct(r.get('overhead')):>8}  "
                     f"{_mark(met)} ({what} >= {target:.0%})")
    return lines, ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Summary of the GPU check: kernel bandwidth and keep-64 targets.")
    p.add_argument("--kernel", type=Path, required=True, help="kernel.json of the kernel benchmark")
    p.add_argument("--perf", type=Path, required=True, help="results.json of vtprune perf")
    p.add_argument("--keep", type=int, default=64, help="budget of the perf rows to show (default 64)")
    args = p.parse_args(argv)
    kernel, perf = _load(args.kernel, "kernel"), _load(args.perf, "perf")
    status = 0 if kernel is not None and perf is not None else 2
    print("== Triton compaction vs a plain copy of the kept bytes (kernel.json)")
    if kernel is not None:
        lines, ok = kernel_lines(kernel)
        print("\n".join(lines))
        status = status or (0 if ok else 3)
    print(f"== keep-{args.keep} prefill (results.json)")
    if perf is not None:
        lines, ok = perf_lines(perf, args.keep)
        print("\n".join(lines))
        status = status or (0 if ok else 3)
    return status


if __name__ == "__main__":
    sys.exit(main())
