"""The outputs of a bench run: the console table, ``results.csv``, ``results.json``, the accuracy-vs-budget plot
``results.png`` and eval-tool style prediction files."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Sequence

from .data import TaskData
from .tasks import gqa as gqa_mod
from .tasks import mme as mme_mod
from .tasks import pope as pope_mod


def _mme_columns(results: dict) -> tuple[bool, bool]:
    reports = [r["scores"]["mme"] for r in results["runs"] if "mme" in r["scores"]]
    return (any(r["perception"] is not None for r in reports), any(r["cognition"] is not None for r in reports))


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


# POPE columns of the table: category means under LLaVA's eval_pope and lmms-eval's conventions
POPE_COLUMNS = ["POPE F1", "POPE acc", "F1 lmms", "acc lmms", "yes %"]
POPE_CELLS = [("llava", "f1"), ("llava", "accuracy"), ("lmms_eval", "f1"), ("lmms_eval", "accuracy"),
              ("llava", "yes_ratio")]


def _table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    has_p, has_c = _mme_columns(results)
    runs = results["runs"]
    header = ["method", "budget", "kept", "equiv"]
    if has_p:
        header.append(f"MME-P/{runs[0]['scores']['mme']['perception_max']:.0f}")
    if has_c:
        header.append(f"MME-C/{runs[0]['scores']['mme']['cognition_max']:.0f}")
    if "gqa" in results["tasks"]:
        header.append("GQA %")
    if "pope" in results["tasks"]:
        header += POPE_COLUMNS
    header += ["prefill ms", "speed-up", "decode ms/tok", "KV KiB", "GFLOPs"]
    rows = []

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in runs:
        budget = _budget(r)
        if r.get("error"):
            rows.append([_run_name(r), budget, "failed (see results.json)"] + [""] * (len(header) - 3))
            continue
        row = [_run_name(r), budget, num(r["kept_tokens"], ".1f"), num(r["equivalent_tokens"], ".1f")]
        if has_p:
            row.append(num(r["scores"]["mme"]["perception"], ".1f"))
        if has_c:
            row.append(num(r["scores"]["mme"]["cognition"], ".1f"))
        if "gqa" in results["tasks"]:
            row.append(num(r["scores"]["gqa"]["accuracy"], ".1f"))
        if "pope" in results["tasks"]:
            pope = r["scores"]["pope"]
            row += [num(pope[conv]["mean"][metric], ".1f") for conv, metric in POPE_CELLS]
        p = r["perf"]
        row += [num(p["prefill_ms"], ".2f"), "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
                num(p["decode_ms_per_token"], ".2f"),
                "-" if p["kv_bytes"] is None else f"{p['kv_bytes'] / 1024:.0f}",
                "-" if p["prefill_flops"] is None else f"{p['prefill_flops'] / 1e9:.3f}"]
        rows.append(row)
    return header, rows


def _pope_category_lines(results: dict) -> list[str]:
    runs = [r for r in results["runs"] if not r.get("error")]
    if not runs:
        return []
    categories = runs[0]["scores"]["pope"]["categories"]
    header = ["config"] + categories
    rows = []
    for r in runs:
        pope = r["scores"]["pope"]
        rows.append([r["label"]] + [
            f"{pope['llava']['categories'][c]['f1']:.1f} / {pope['lmms_eval']['categories'][c]['f1']:.1f} / "
            f"{pope['llava']['categories'][c]['yes_ratio']:.0f}" for c in categories])
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in [header] + rows]


def format_table(results: dict) -> str:
    """The summary table ``vtprune bench`` prints (plus the MME per-subtask and POPE per-category scores and a
    legend)."""
    header, rows = _table_rows(results)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    if "mme" in results["tasks"]:
        subtasks = list(results["runs"][0]["scores"]["mme"]["subtasks"])
        lines += ["", "MME subtask score (acc + acc+, max 200 each):"]
        sub_rows = [[r["label"]] + [f"{r['scores']['mme']['subtasks'][s]['score']:.1f}" for s in subtasks]
                    for r in results["runs"] if not r.get("error")]
        sw = [max(len(x) for x in col) for col in zip(["config"] + subtasks, *sub_rows)]
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(["config"] + subtasks, sw))))
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, sw)))
                  for row in sub_rows]
    if "pope" in results["tasks"]:
        lines += ["", "POPE per category, F1 % as LLaVA eval_pope / lmms-eval (exact yes|no) / predicted yes %:"]
        lines += _pope_category_lines(results)
    failed = [r for r in results["runs"] if r.get("error")]
    if failed:
        lines += ["", "failed configurations:"] + [f"  {r['label']}: {r['error']}" for r in failed]
    meta = results["meta"]
    lines += ["", f"model: {meta['model']['name']} ({meta['visual_tokens']} visual tokens/image); "
                  f"kept/equiv = visual tokens per image (equiv = layer-averaged); prefill ms = median per sample "
                  f"over {meta['settings']['timing_samples']} samples; speed-up = vanilla prefill / prefill"]
    if "pope" in results["tasks"]:
        lines.append("POPE F1/acc: LLaVA eval_pope (first sentence, a no/not word = no, else yes); F1/acc lmms: "
                     "lmms-eval (the answer must be exactly yes or no); yes % = predicted yes (LLaVA); "
                     "means over the categories")
    return "\n".join(lines)


def _csv_rows(results: dict) -> list[dict]:
    rows = []
    for r in results["runs"]:
        row = {k: r[k] for k in ("label", "method", "keep", "ratio", "visual_tokens", "kept_tokens",
                                 "equivalent_tokens")}
        row["config"] = r.get("config")
        row["error"] = r.get("error")
        if "mme" in r["scores"]:
            m = r["scores"]["mme"]
            row.update({"mme_perception": m["perception"], "mme_cognition": m["cognition"], "mme_total": m["total"]})
            for name, s in m["subtasks"].items():
                row.update({f"mme_{name}_acc": s["acc"], f"mme_{name}_acc_plus": s["acc_plus"],
                            f"mme_{name}_score": s["score"]})
        if "gqa" in r["scores"]:
            row["gqa_accuracy"] = r["scores"]["gqa"]["accuracy"]
        if "pope" in r["scores"]:
            pope = r["scores"]["pope"]
            for conv in pope_mod.CONVENTIONS:
                for metric in pope_mod.METRICS:
                    row[f"pope_{metric}_{conv}"] = pope[conv]["mean"][metric]
                row[f"pope_other_{conv}"] = pope[conv]["all"]["other"]
                for cat, m in pope[conv]["categories"].items():
                    for metric in pope_mod.METRICS:
                        row[f"pope_{cat}_{metric}_{conv}"] = m[metric]
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
        title = results["tasks"][task]["metric"]
        if task == "mme":
            title += f" (max {results['runs'][0]['scores']['mme']['total_max']:.0f})"
        ax.set_title(title)
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
            preds = [e["prediction"] for e in entries]
            if name == "mme":
                mme_mod.write_results_dir(target / "mme", by_name[name].questions, preds)
            elif name == "pope":
                pope_mod.write_answers(target / "pope_answers.jsonl", by_name[name].questions, preds)
            else:
                target.mkdir(parents=True, exist_ok=True)
                gqa_mod.write_predictions(target / "gqa_predictions.json", by_name[name].questions, preds)
    return paths
