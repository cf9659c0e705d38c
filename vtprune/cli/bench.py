"""``vtprune bench`` / ``vtprune-bench`` / ``python -m vtprune.benchmarks``: accuracy and speed of pruning methods.

With no arguments: the embedded tiny LLaVA on the embedded synthetic MME and GQA sets, vanilla plus every
token-removing method at LLaVA's 192/128/64-of-576 budgets scaled to the model, into ./out/bench. ::

    vtprune bench --task gqa --methods fastv,visionzip --keep 48,16 --limit 100
    vtprune bench --task pope --methods fastv --keep 32               # the embedded synthetic POPE set
    vtprune bench --model ./llava-1.5-7b-hf --data /data/MME_Benchmark_release_version --dtype float16
    torchrun --nproc_per_node 2 -m vtprune.benchmarks --limit 40      # data-parallel, same scores
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from ..eval.checks import COUNT_FLAGS, budget_errors, check_counts  # noqa: F401  (torch-free; COUNT_FLAGS kept here for scripts)

__all__ = ["add_arguments", "build_parser", "settings_from_args", "parse_data", "run_from_args", "main"]

DESCRIPTION = """\
Accuracy and speed of visual-token pruning methods on MME / GQA / POPE: vanilla and every pruned configuration in
one process, greedy decoding, official scoring, a separate timing pass for prefill / decode / KV / FLOPs.
With no arguments: the embedded tiny LLaVA on the embedded synthetic MME and GQA sets, every token-removing
method at LLaVA's 192/128/64-of-576 budgets scaled to the model, into ./out/bench."""

EPILOG = """\
examples:
  vtprune bench --task gqa --methods fastv,visionzip --keep 48,16 --limit 100
  vtprune bench --task mme,gqa,pope --methods fastv --keep 32
  vtprune bench --model ./llava-1.5-7b-hf --data /data/MME_Benchmark_release_version --dtype float16
  torchrun --nproc_per_node 2 -m vtprune.benchmarks --limit 40
  vtprune bench --config flowcut/llava-1.5-7b --config ./my_fastv.yaml --set positions=renumber

--config takes a method config (a YAML file with method:, an optional keep: or ratio: and method fields, as
vtprune/configs/<method>/<model>.yaml; or a shipped name such as flowcut/llava-1.5-7b), read as
vtprune.prune(model, config=...) reads it. A config with its own budget runs once at that budget, one without is
swept over --keep/--ratio; its row is labelled method@budget[file stem]. With --config and no --methods only the
configs run (plus vanilla). A pipeline config (a YAML list of {method: ..., fields}, or that list under
pipeline:) runs once, as the file says, labelled a+b[file stem]. --set KEY=VALUE applies a method field to every
pruned configuration (over a config file's value; not to pipelines); every method in the run must have that field.

Decoding uses the KV cache, so FastV chooses its kept set once, at the prefill. With use_cache=False (not used
here) every generated step is a full prefill and FastV re-chooses its kept set at each step.

Bad flags, files and folders are reported as one line and exit status 2 before the model is loaded; a
configuration the loaded model refuses (e.g. --set layer=99 on a shallower LLM) likewise, before vanilla runs.
A configuration that fails while running is reported (with its traceback) and makes the exit status 1.
Ctrl-C stops the run with one line and exit status 130; nothing is written.

--task takes mme, gqa, pope, a comma-separated list of them, or all (the default: MME and GQA, or every task
given a --data folder). POPE is scored two ways side by side: LLaVA's eval_pope.py (first sentence; a No/no/not
word = no, anything else = yes) and lmms-eval's (the answer must be exactly yes or no); the table shows F1 and
accuracy under both (means over the random / popular / adversarial categories) and the predicted yes %.

--data takes a folder and works out its format (a GQA folder has testdev_balanced_questions.json and images/;
an MME folder has one folder per subtask, as MME_Benchmark_release_version; a POPE folder has the official
coco_pope_{random,popular,adversarial}.json files or one *pope*.jsonl of question/answer/image/category records,
and images/ or val2014/); prefix it with mme=, gqa= or pope= to say which, and repeat the flag to give several.
Without --data the embedded synthetic sets are used.

Outputs in --out: results.json (scores, per-question predictions, timings), results.csv, results.png (score vs
layer-averaged equivalent tokens per image) and predictions/<config>/ in the official MME eval_tool / GQA
eval.py formats (POPE: a LLaVA-style answers JSONL).
Under torchrun (WORLD_SIZE > 1) questions are sharded over ranks and rank 0 scores and writes.
"""


def _csv_list(kind):
    def parse(text: str):
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [kind(x) for x in items]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"bad list {text!r}: {err}") from None

    parse.__name__ = f"comma-separated {kind.__name__} list"
    return parse


def _task_list(text: str) -> str:
    """``--task``: ``all`` or a comma-separated list of known tasks (returned normalised, e.g. ``mme,pope``)."""
    from ..eval.tasks import TASKS

    items = list(dict.fromkeys(x.strip().lower() for x in text.split(",") if x.strip()))
    if items == ["all"]:
        return "all"
    bad = [x for x in items if x not in TASKS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown task {','.join(bad) or repr(text)}; choose from "
                                         f"{', '.join(TASKS)}, a comma-separated list of them, or all")
    return ",".join(items)


_task_list.__name__ = "task list"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the bench flags to ``p`` (used by ``vtprune bench`` and the standalone entry points)."""
    from ..eval.tasks.prompts import PROMPT_STYLES

    g = p.add_argument_group("what to run")
    g.add_argument("--model", default=None,
                   help="local model folder (or a hub id where the hub is reachable); default: the embedded tiny LLaVA")
    g.add_argument("--task", type=_task_list, default="all", metavar="{mme,gqa,pope,all}",
                   help="benchmark(s) to run, e.g. pope or mme,gqa,pope (default: all = MME and GQA, or the "
                        "tasks given --data)")
    g.add_argument("--data", action="append", default=[], metavar="[TASK=]DIR",
                   help="benchmark folder (MME release folder, GQA folder or POPE folder); repeatable")
    g.add_argument("--methods", type=_csv_list(str), default=None, metavar="M1,M2",
                   help="methods to compare with vanilla (default: every token-removing method)")
    g.add_argument("--keep", type=_csv_list(int), default=None, metavar="K1,K2",
                   help="visual tokens kept per image (default: 192/128/64 of 576 scaled to the model)")
    g.add_argument("--ratio", type=_csv_list(float), default=None, metavar="R1,R2",
                   help="fractions of visual tokens removed, in [0, 1), e.g. 0.5,0.75 (in addition to --keep)")
    g.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="method config file or shipped name (e.g. flowcut/llava-1.5-7b) to compare; repeatable")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="method field for every pruned configuration, e.g. --set layer=3; repeatable")
    g.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                   help="first N questions per task (MME: N/2 images, round-robin over subtasks; POPE: "
                        "round-robin over categories)")
    g = p.add_argument_group("how to run")
    g.add_argument("--batch-size", type=_positive_int, default=16)
    g.add_argument("--max-new-tokens", type=_positive_int, default=8, help="greedy decoding length cap (default 8)")
    g.add_argument("--prompt-style", choices=PROMPT_STYLES, default="llava_v1",
                   help="llava_v1 = LLaVA-1.5 paper prompt (Vicuna system prompt); chat_template = the processor's")
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help="auto: float16 on CUDA, float32 on CPU")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    g = p.add_argument_group("timing pass")
    g.add_argument("--timing-samples", type=int, default=4, metavar="N",
                   help="single-sample inputs timed per configuration (0 = no timing)")
    g.add_argument("--timing-repeats", type=_positive_int, default=5, help="timed repeats per sample (median)")
    g.add_argument("--decode-tokens", type=int, default=8, help="tokens for decode ms/token (0 = skip)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=os.path.join("out", "bench"), help="output folder (default: out/bench)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--list-methods", action="store_true", help="print the available methods and exit")
    return p


def build_parser(prog: str = "vtprune-bench") -> argparse.ArgumentParser:
    from .args import OneLineParser

    p = OneLineParser(prog=prog, description=DESCRIPTION,
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_arguments(p)


def parse_data(task: str, entries: list[str]) -> tuple[list[str], dict]:
    """(tasks to run, task -> folder) from ``--task`` (``all``, a task or a comma-separated list) and the
    ``--data`` entries. ``all`` is every task given a folder, or without --data the default MME and GQA."""
    from ..eval.tasks import DEFAULT_TASKS, TASKS

    data: dict[str, Path] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if sep and name in TASKS:
            folder = _data_folder(entry, path)
        else:
            folder = _data_folder(entry, entry)
            from ..eval.data import detect_task  # torch comes with it: only for a folder whose task is not given

            try:
                name = detect_task(folder)
            except ValueError as err:  # a folder of no known format: name the flag, as the other --data errors
                raise ValueError(f"--data {entry}: {str(err).removeprefix('vtprune bench: ')}") from None
        if name in data:
            raise ValueError(f"--data given twice for {name}: {data[name]} and {folder}")
        data[name] = folder
    if task == "all":
        tasks = [t for t in TASKS if t in data] if data else list(DEFAULT_TASKS)
    else:
        tasks = list(dict.fromkeys(t.strip() for t in task.split(",") if t.strip()))
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"--task {task}: unknown task {','.join(unknown) or repr(task)}; "
                             f"choose from {', '.join(TASKS)}")
        other = sorted(set(data) - set(tasks))
        if other:
            raise ValueError(f"--task {task} but --data points to a {', '.join(other)} folder "
                             f"({', '.join(str(data[o]) for o in other)})")
    return tasks, data


def _data_folder(entry: str, path: str) -> Path:
    """The folder of the ``--data`` entry ``entry``; a missing one or a file is an error naming the entry."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--data {entry}: {folder} is a file; give the benchmark folder (MME, GQA or "
                                 "POPE format)")
    if not folder.is_dir():
        raise FileNotFoundError(f"--data {entry}: folder {folder} does not exist")
    return folder


def _check_light(args) -> None:
    """The flags checked without torch, so that a mistake in them is reported at once (the runner checks the
    rest: device, methods, config files)."""
    from .args import UsageError, check_model_spec, check_out_dir

    problem = budget_errors(args.keep or (), args.ratio or ())
    if problem:
        raise UsageError(problem)
    check_counts(args)
    check_model_spec(args.model)
    check_out_dir(args.out)


def _check_methods_light(args, hyper: dict) -> None:
    """--methods names, their --set fields and --config files that exist, checked without torch (the texts of
    the runner's checks, which repeat them with the field values)."""
    from .known import check_config_exists, check_set_fields, known_method

    methods = [known_method(m)[0] for m in args.methods or ()]  # an unknown one: the registry's ConfigError
    check_set_fields(methods, hyper)
    for spec in args.config:
        check_config_exists(spec)


def settings_from_args(args):
    """BenchSettings from parsed flags; a bad value is a :class:`~vtprune.cli.UsageError`."""
    from .args import UsageError, parse_set

    hyper = parse_set(args.set)
    try:
        tasks, data = parse_data(args.task, args.data)
        _check_light(args)
        _check_methods_light(args, hyper)
        from ..eval.sweep import BenchSettings, validate_methods

        methods = validate_methods(args.methods) if args.methods is not None else None
        return BenchSettings(
            model=args.model, tasks=tuple(tasks), data=data, methods=methods, keeps=args.keep, ratios=args.ratio,
            configs=tuple(args.config), hyper=hyper, limit=args.limit, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, prompt_style=args.prompt_style, dtype=args.dtype,
            device=args.device, out=args.out, seed=args.seed, timing_samples=args.timing_samples,
            timing_repeats=args.timing_repeats, decode_tokens=args.decode_tokens, threads=args.threads,
            progress=not args.no_progress,
        )
    except (OSError, ValueError) as err:  # missing or mismatched --data, unknown method, bad setting
        raise UsageError(str(err)) from None


@contextlib.contextmanager
def _quiet_transformers():
    """No transformers info logs / loading bars and one-line warnings while the bench runs (restored after)."""
    import warnings

    from ..loading import quiet_hf_logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    old_format = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"{category.__name__}: {message}\n"
    try:
        with quiet_hf_logging():
            yield
    finally:
        warnings.formatwarning = old_format


def _print_methods() -> None:
    from ..eval.sweep import default_methods
    from ..registry import list_methods

    default = set(default_methods())
    for name, desc in list_methods().items():
        mark = "*" if name in default else " "
        print(f"{mark} {name:<14} {desc}")
    print("(* = in the default bench list)")


def run_from_args(args, prog: str = "vtprune bench") -> int:
    """Run a parsed bench command line; returns the exit status (2 for bad input, with a one-line error).
    Only :class:`~vtprune.cli.UsageError` is shortened to one line: anything else keeps its traceback."""
    from .args import UsageError, report

    if args.list_methods:
        _print_methods()
        return 0
    debug = os.environ.get("VTPRUNE_DEBUG", "") not in ("", "0")
    try:
        settings = settings_from_args(args)
        from ..eval import report as bench_report, run as runner  # torch and transformers: after the checks that need neither

        start = time.perf_counter()
        with _quiet_transformers():
            results = runner.run_bench(settings)  # checks everything it can before loading the model
    except UsageError as err:  # bad flags, files, folders, methods, devices; a model that does not load
        if debug:
            raise
        return report(prog, err)
    except KeyboardInterrupt:  # Ctrl-C: one line instead of the traceback of wherever the run was
        if debug:
            raise
        print(f"{prog}: interrupted; nothing written (the results are written once every configuration has run)",
              file=sys.stderr)
        return 130
    if results is None:  # a non-zero rank of a torchrun job
        return 0
    out = Path(settings.out)
    print(bench_report.format_table(results))
    print(f"\nwrote {out / 'results.json'}, {out / 'results.csv'}, {out / 'results.png'} "
          f"({time.perf_counter() - start:.1f} s)")
    failed = [r["label"] for r in results["runs"] if r.get("error")]
    if failed:
        print(f"{prog}: {len(failed)} configuration(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    """Entry point of ``vtprune-bench`` and ``python -m vtprune.benchmarks``."""
    parser = build_parser()
    return run_from_args(parser.parse_args(argv), prog=parser.prog)



def add(subparsers) -> None:
    """Register ``bench`` on the ``vtprune`` parser."""
    p = subparsers.add_parser(
        "bench", help="benchmark pruning methods (accuracy + prefill speed) on MME / GQA / POPE",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(handler=lambda args: run_from_args(args, prog="vtprune bench"))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
