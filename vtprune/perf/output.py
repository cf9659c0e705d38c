"""What ``vtprune perf`` writes: the stdout table, ``results.json``, ``results.csv`` and ``results.png``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

__all__ = ["format_perf_table", "write_results", "plot_speedups", "TARGETS"]

# the targets, reported (never asserted): CPU / GPU
TARGETS = {"oracle_fraction": 0.95, "overhead": 0.03, "ideal_fraction_gpu": 0.85}

_COLUMNS = (  # (header, key, format) ; format "%" = percent, "x" = ratio, "MiB" = bytes / 2**20; fields with a
    # spread over rounds (<key>_q1 / <key>_q3 in the record) show "median ±half the interquartile range"
    ("kept", "visual_tokens", "d"), ("equiv", "equivalent_tokens", ".1f"), ("prefill ms", "prefill_ms", ".1f"),
    ("vision ms", "vision_ms", ".1f"), ("speed-up", "speedup", "x"),
    ("oracle %", "oracle_fraction", "%"), ("ideal %", "ideal_fraction", "%"), ("overhead %", "overhead", "%"),
    ("replay %", "replay_fraction", "%"), ("scoring %", "scoring_overhead", "%"), ("peer ms", "peer_ms", ".1f"),
    ("peer x", "peer_ratio", "x"), ("decode ms/tok", "decode_ms_per_token", ".1f"), ("KV MiB", "kv_bytes", "MiB"),
    ("KV MiB (analytic)", "kv_bytes_analytic", "MiB"), ("peak MiB", "peak_memory_bytes", "MiB"),
    ("GFLOPs", "prefill_gflops", ".1f"), ("attn FLOPs -%", "attention_flop_reduction", "%"),
)


def _cell(value, fmt: str, half_iqr=None) -> str:
    if value is None:
        return "-"
    if half_iqr is not None:
        scale = 100 if fmt == "%" else 1
        return f"{_cell(value, fmt)} ±{scale * half_iqr:.{2 if fmt == 'x' else 1}f}"
    if fmt == "%":
        return f"{100 * value:.1f}"
    if fmt == "x":
        return f"{value:.2f}x"
    if fmt == "MiB":
        return f"{value / 2**20:.1f}"
    return format(value, fmt)


def _row_values(r: dict) -> dict:
    f = r.get("flops")
    gflops = (f["vision"] + f["projector"] + f["llm_prefill"]) / 1e9 if f else None
    return {**r, "prefill_gflops": gflops}


def format_perf_table(rows: list[dict], meta: dict) -> str:
    """The table ``vtprune perf`` prints, with a legend and the targets each configuration meets or misses."""
    header = ["config"] + [h for h, _, _ in _COLUMNS]
    cells = [[r["label"]] + [_cell(_row_values(r).get(key), fmt, _half_iqr(r, key)) for _, key, fmt in _COLUMNS]
             for r in rows if not r.get("error")]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *cells)]
    lines = [_line(header, widths), "  ".join("-" * w for w in widths)] + [_line(c, widths) for c in cells]
    lines += [f"{r['label']}  failed: {r['error']}" for r in rows if r.get("error")]
    lines += ["", _legend(meta)] + noise_lines(meta.get("noise")) + _target_lines(rows)
    return "\n".join(lines)


def _half_iqr(r: dict, key: str):
    """Half the interquartile range over rounds of a field that has one (None: shown without a spread)."""
    q1, q3 = r.get(f"{key}_q1"), r.get(f"{key}_q3")
    return None if q1 is None or q3 is None else (q3 - q1) / 2


def noise_lines(noise: dict | None) -> list[str]:
    """The machine-noise line (vanilla's own round-to-round spread) and, above the threshold, a warning."""
    if noise is None:
        return ["machine noise: unknown (no vanilla rounds)"]
    lines = [f"machine noise: vanilla prefill varies {100 * noise['iqr']:.1f} % between rounds (interquartile range "
             f"/ median over {noise['rounds']} rounds; max - min: {100 * noise['range']:.1f} %)"]
    if noise["rounds"] < 4:
        lines.append(f"warning: {noise['rounds']} round(s) cannot show how noisy this machine is; use --rounds 8 "
                     "or more")
    if noise["warning"]:
        lines.append(f"warning: machine noise {100 * noise['iqr']:.1f} % > {100 * noise['threshold']:.0f} %: this "
                     "machine is busy or throttling, so ratios differing by less than about that are not "
                     "meaningful; rerun on a quiet machine or with more --rounds")
    return lines


def _line(cells, widths) -> str:
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def _legend(meta: dict) -> str:
    return (
        f"model: {meta['model']}; {meta['rounds']} interleaved rounds after {meta['warmup']} warm-up (every "
        f"configuration once per round, back to back; odd rounds in reverse order); {meta['device']} "
        f"{meta['dtype']}, {meta['threads']} threads. prefill = time to the first token of a greedy generate, median "
        "over rounds; every ratio is the median over rounds of the ratio of that round's timings (paired), ± = half "
        "the interquartile range over rounds; oracle % = oracle prefill / prefill at the same budget (share of the "
        "oracle's speed-up); ideal % = speed-up / (vanilla prefill FLOPs / prefill FLOPs); overhead % = (prefill - "
        "oracle) / vanilla; replay % and scoring % = the same against a replay of the method's own token schedule "
        "without scoring (methods that cut inside the vision tower or the LLM; else the oracle); peer = the same "
        "configuration under eager attention with attention outputs requested (official-code style); KV after the "
        "prefill, from the cache tensors and analytic (a method's own KV store: its packed / evicted size, ZipVL); "
        "GFLOPs = vision + projector + LLM prefill; attn FLOPs -% = a layer-wise "
        "sparsifier's own attention-FLOP reduction, 1 - mean over layers of (p / n)^2 (ZipVL)."
    )


def _target_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["kind"] != "method" or r.get("error") or r["oracle_fraction"] is None:
            continue
        ok_oracle = r["oracle_fraction"] >= TARGETS["oracle_fraction"]
        ok_overhead = r["overhead"] <= TARGETS["overhead"]
        sched = r["replay_fraction"]
        out.append(
            f"  {r['label']}: oracle {100 * r['oracle_fraction']:.1f}% (rounds' IQR {_iqr(r, 'oracle_fraction')}; "
            f"{'meets' if ok_oracle else 'misses'} >= 95%), "
            f"overhead {100 * r['overhead']:.1f}% ({'meets' if ok_overhead else 'misses'} <= 3%)"
            + (f"; own schedule {100 * sched:.1f}%, scoring {100 * r['scoring_overhead']:.1f}%" if sched else "")
        )
    return ["targets (CPU: >= 95% of the oracle's speed-up, overhead <= 3% of vanilla prefill):"] + out if out else []


def _iqr(r: dict, key: str) -> str:
    return f"{100 * r[f'{key}_q1']:.1f}-{100 * r[f'{key}_q3']:.1f}%"


def write_results(rows: list[dict], meta: dict, out_dir) -> list[Path]:
    """results.json ({"meta", "results"}), results.csv (one row per configuration, FLOPs split into columns)
    and results.png in ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.csv", out / "results.png"]
    paths[0].write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    flat = [{**{k: v for k, v in r.items() if k != "flops" and not isinstance(v, list)},  # rounds: in the json
             **{f"flops_{k}": v for k, v in (r.get("flops") or {}).items()}} for r in rows]
    keys = list(dict.fromkeys(k for row in flat for k in row))
    with paths[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(flat)
    plot_speedups(rows, paths[2], meta)
    return paths


def plot_speedups(rows: list[dict], path, meta: dict) -> None:
    """Speed-up vs kept visual tokens: one line per method, the oracle and the FLOPs ideal dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[str, list] = {}
    for r in rows:
        if r.get("error") or r["speedup"] is None or r["kind"] == "vanilla" or r["visual_tokens"] is None:
            continue
        name = r["name"] if r["kind"] != "replay" else None
        if name is None or r.get("evict_early_kv"):
            continue
        lines.setdefault(name, []).append((r["visual_tokens"], r["speedup"], r["ideal_speedup"]))
    for name, points in sorted(lines.items()):
        points.sort()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if name == "oracle":
            ax.plot(xs, ys, "k--", marker="o", label="oracle")
            ideal = [p[2] for p in points]
            if all(v is not None for v in ideal):
                ax.plot(xs, ideal, color="grey", linestyle=":", marker="s", label="FLOPs ideal")
        else:
            ax.plot(xs, ys, marker=".", label=name)
    ax.set_xlabel("visual tokens kept (per prompt)")
    ax.set_ylabel("prefill speed-up vs vanilla")
    ax.set_title(f"vtprune perf: {meta['model']} ({meta['device']}, {meta['dtype']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
