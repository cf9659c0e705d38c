"""The outputs of a bench run: the console table, ``results.csv``, ``results.json``, the accuracy-vs-budget plot
``results.png`` and eval-tool style prediction files."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Sequence

from .data import TaskData
from .tasks import TASKS, get_task
from .tasks.base import cell


def _tasks(results: dict) -> list:
    """The :class:`~.tasks.base.BenchTask` of every task the run scored, in the order of ``TASKS``."""
    return [get_task(t) for t in TASKS if t in results["tasks"]]


def _run_name(run: dict) -> str:
    """The method, and the config file a run comes from (its table row and plot line)."""
    return run["method"] + (f" [{run['config']}]" if run.get("config") else "")


def _budget(run: dict) -> str:
    """The nominal budget of a run as the table and the plot name it: keep N, ratio R, schedule, - for vanilla."""
    if run["method"] == "vanilla":
        return "-"
    if run["keep"] is not None:
        return f"keep {run['keep']}"
    return f"ratio {run['ratio']:g}" if run["ratio"] is not None else "schedule"


def _table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    runs, tasks = results["runs"], _tasks(results)
    header = ["method", "budget", "kept", "equiv"]
    for task in tasks:
        header += task.table_columns(results)
    header += ["prefill ms", "speed-up", "decode ms/tok", "KV KiB", "GFLOPs"]
    rows = []
    for r in runs:
        budget = _budget(r)
        if r.get("error"):
            rows.append([_run_name(r), budget, "failed (see results.json)"] + [""] * (len(header) - 3))
            continue
        row = [_run_name(r), budget, cell(r["kept_tokens"], ".1f"), cell(r["equivalent_tokens"], ".1f")]
        for task in tasks:
            row += task.table_cells(results, r["scores"][task.name])
        p = r["perf"]
        row += [cell(p["prefill_ms"], ".2f"), "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
                cell(p["decode_ms_per_token"], ".2f"),
                "-" if p["kv_bytes"] is None else f"{p['kv_bytes'] / 1024:.0f}",
                "-" if p["prefill_flops"] is None else f"{p['prefill_flops'] / 1e9:.3f}"]
        rows.append(row)
    return header, rows


def format_table(results: dict) -> str:
    """The summary table ``vtprune bench`` prints (plus the MME per-subtask and POPE per-category scores and a
    legend)."""
    header, rows = _table_rows(results)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    for task in _tasks(results):
        lines += task.detail_lines(results)
    failed = [r for r in results["runs"] if r.get("error")]
    if failed:
        lines += ["", "failed configurations:"] + [f"  {r['label']}: {r['error']}" for r in failed]
    meta = results["meta"]
    lines += ["", f"model: {meta['model']['name']} ({meta['visual_tokens']} visual tokens/image); "
                  f"kept/equiv = visual tokens per image (equiv = layer-averaged); prefill ms = median per sample "
                  f"over {meta['settings']['timing_samples']} samples; speed-up = vanilla prefill / prefill"]
    for task in _tasks(results):
        lines += task.legend_lines(results)
    return "\n".join(lines)


def _csv_rows(results: dict) -> list[dict]:
    rows = []
    for r in results["runs"]:
        row = {k: r[k] for k in ("label", "method", "keep", "ratio", "visual_tokens", "kept_tokens",
                                 "equivalent_tokens")}
        row["config"] = r.get("config")
        row["error"] = r.get("error")
        for name in TASKS:
            if name in r["scores"]:
                row.update(get_task(name).csv_fields(r["scores"][name]))
        row.update(r["perf"])
        row["speedup"] = r["speedup"]
        rows.append(row)
    return rows


def write_csv(results: dict, path: Path) -> Path:
    rows = _csv_rows(results)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _plot_points(results: dict, task: str) -> dict[str, list[tuple[float, float, str]]]:
    """(equivalent tokens, score, budget) of every pruned run that did not fail, by run name, sorted by tokens."""
    by_method: dict[str, list[tuple[float, float, str]]] = {}
    for r in results["runs"]:
        if r.get("error") or r["method"] == "vanilla":
            continue
        by_method.setdefault(_run_name(r), []).append((r["equivalent_tokens"], r["scores"][task]["score"],
                                                       _budget(r)))
    return {name: sorted(pts) for name, pts in by_method.items()}


def plot_results(results: dict, path: Path) -> Path:
    """Score vs cost: one panel per task, one line per method, each point at its layer-averaged equivalent visual
    tokens per image (what the LLM processes on average: FastV at keep 16 still runs its early layers on every
    token) and labelled with its nominal budget; vanilla as a dashed line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in results["runs"]:
            if r["method"] == "vanilla" and not r.get("error"):
                score = r["scores"][task]["score"]
                ax.axhline(score, color="black", linestyle="--", linewidth=1.2, label=f"vanilla ({score:.1f})")
        xs = [results["meta"]["visual_tokens"]]
        for method, pts in _plot_points(results, task).items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
            for x, y, budget in pts:
                ax.annotate(budget, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6, alpha=0.7)
            xs += [p[0] for p in pts]
        ax.set_title(get_task(task).plot_title(results))
        ax.set_xlim(0, max(xs) * 1.05)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("equivalent visual tokens per image (layer-averaged)")
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['meta']['model']['name']}: score vs equivalent visual tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@=" else "_" for c in label)


def write_outputs(results: dict, out: str | os.PathLike, tasks: Sequence[TaskData] = ()) -> dict:
    """``results.json``, ``results.csv``, ``results.png`` and, per configuration, the official result formats
    (MME ``eval_tool`` folder, GQA predictions file, POPE LLaVA-style answers JSONL) under
    ``predictions/<label>/``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "png": out / "results.png"}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    write_csv(results, paths["csv"])
    plot_results(results, paths["png"])
    by_name = {t.name: t for t in tasks}
    for r in results["runs"]:
        target = out / "predictions" / _safe(r["label"])
        for name, entries in r["predictions"].items():
            if name not in by_name:
                continue
            get_task(name).write_predictions(target, by_name[name].questions, [e["prediction"] for e in entries])
    return paths
