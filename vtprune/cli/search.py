"""``vtprune search``: tune a method's hyperparameters with optuna (see :mod:`vtprune.search.study`)."""

from __future__ import annotations

import argparse
import math
import os
import sys

__all__ = ["DESCRIPTION", "EPILOG", "add_arguments", "settings_from_args", "run_from_args"]

DESCRIPTION = """\
Tune a pruning method's hyperparameters at a fixed budget with optuna: the label-free flow objective (how close
the pruned model's final-norm last-token state stays to the unpruned one) or accuracy on a dev split, optionally
against the measured prefill time (--pareto). Trial 0 is the method's defaults. The study lives in a database
(an SQLite file in --out by default): rerunning the command continues it, and workers on several machines can
share one through --storage. Writes best.yaml (a config for vtprune.prune(model, config=...) and vtprune bench
--config), trials.csv and a plot into --out."""

EPILOG = """\
examples:
  vtprune search --method vflowopt --keep 16 --trials 30
  vtprune search --method flowcut --keep 32 --objective accuracy --task gqa --trials 40
  vtprune search --method fastv --keep 32 --pareto --trials 30
  vtprune search --method visionzip,fastv --keep 48,32 --set fastv.layer=2      # a pipeline: prefixed names
  vtprune search --method vflowopt --keep 64 --model ./llava-1.5-7b-hf --data gqa=/data/gqa_val \\
      --storage postgresql://user:pw@db-host/optuna --study vflowopt-7b-keep64   # run on every machine

--trials N is the number of finished trials the study should have (all workers together); a killed or
interrupted run leaves the finished ones in the storage and the same command continues to N. Ctrl-C stops after
the current trial (twice: at once). --timeout S stops this worker after S seconds (the current trial finishes).

Dev split: without --data, synthetic MME / GQA / POPE sets drawn with their own seeds (never the sets vtprune
bench tests on); with --data (as bench reads it: DIR or TASK=DIR, repeatable) that folder, which should be one
you do not bench on. --calib N: flow samples (default 30), or accuracy questions per task (default all).
--set KEY=VALUE fixes a field (not searched); --params A,B searches only those. In a pipeline both take the
method-prefixed names (fastv.layer); --keep / --ratio take one value per method (- for none).
Samplers: tpe (default), gp (needs scipy), cmaes (needs cmaes). Accuracy trials are answered in 4 chunks and
stopped early by a median pruner. An average-budget method (vflowopt) whose schedule exceeds the budget by more
than one token is infeasible: reported, never best.
Bad flags, methods, parameters, storage URLs and an empty search space are one line and exit status 2, before
anything is loaded or written."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _budget(kind):
    from ..search.plan import parse_budget_list

    def parse(text: str):
        try:
            return parse_budget_list(text, kind)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} or a comma-separated list "
                                             f"(- for none), got {text!r}") from None

    parse.__name__ = f"{kind.__name__} budget"
    return parse


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the search flags to ``p``."""
    from ..eval.tasks.prompts import PROMPT_STYLES

    g = p.add_argument_group("what to tune")
    g.add_argument("--model", default=None, help="model folder or hub id (default: the embedded tiny LLaVA)")
    g.add_argument("--method", required=True, help="method name, or a comma-separated pipeline (see vtprune methods)")
    g.add_argument("--keep", type=_budget(int), default=None, metavar="K[,K2]",
                   help="visual tokens kept per image (fixed, not searched)")
    g.add_argument("--ratio", type=_budget(float), default=None, metavar="R[,R2]",
                   help="fraction of visual tokens removed, in [0, 1) (instead of --keep)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fix a field (repeatable)")
    g.add_argument("--params", default=None, metavar="A,B", help="search only these fields")
    g = p.add_argument_group("objective")
    g.add_argument("--objective", choices=("flow", "accuracy"), default="flow",
                   help="flow: label-free final-state similarity (default); accuracy: dev-split score")
    g.add_argument("--pareto", action="store_true", help="also minimise the measured prefill time; report the front")
    g.add_argument("--data", action="append", default=[], metavar="[TASK=]DIR",
                   help="dev folder (MME, GQA or POPE format); default: the synthetic dev split")
    g.add_argument("--task", default=None, metavar="mme,gqa",
                   help="tasks to calibrate / score on (default: mme,gqa, or the --data ones)")
    g.add_argument("--calib", type=_positive_int, default=None, metavar="N",
                   help="flow: calibration samples (30); accuracy: questions per task (all)")
    g = p.add_argument_group("study")
    g.add_argument("--trials", type=_positive_int, default=30, help="finished trials in the study (default 30)")
    g.add_argument("--study", default=None, help="study name (default: <method>-<budget>-<objective>)")
    g.add_argument("--storage", default=None, metavar="URL",
                   help="optuna RDB URL, e.g. postgresql://user:pw@host/db (default: sqlite:///<out>/study.db)")
    g.add_argument("--out", default=None, help="output folder (default: out/search/<study>)")
    g.add_argument("--sampler", choices=("tpe", "gp", "cmaes"), default="tpe")
    g.add_argument("--timeout", type=_positive_float, default=None, metavar="S", help="stop this worker after S seconds")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("how to run")
    g.add_argument("--batch-size", type=_positive_int, default=8)
    g.add_argument("--max-new-tokens", type=_positive_int, default=8, help="accuracy: greedy answer length cap")
    g.add_argument("--prompt-style", choices=PROMPT_STYLES, default="llava_v1")
    g.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--no-progress", action="store_true", help="a line per trial instead of a progress bar")
    return p


def _check_light(args) -> None:
    """The method names, one method's budget and --out, checked without torch (the texts of
    ``search.plan.make_plan`` and ``search.checks``, which repeat them with everything else)."""
    from .args import UsageError, check_out_dir
    from .known import known_method

    names = [m.strip() for m in args.method.split(",")]
    if not all(names):
        return  # make_plan names the problem
    for m in names:
        try:
            known_method(m)
        except ValueError as err:
            raise UsageError(f"--method {m}: {err}") from None
    if len(names) == 1 and not isinstance(args.keep, list) and not isinstance(args.ratio, list):
        name, info = known_method(names[0])
        given = args.keep is not None or args.ratio is not None
        if info.has_budget and not info.budget_optional and not given:
            raise UsageError(f"--method {name} needs a budget (it is fixed, not searched): give --keep or --ratio")
        if given and not info.has_budget:
            raise UsageError(f"--method {name} has no ratio / keep budget (its schedule decides); "
                             "drop --keep / --ratio")
        if not args.set:  # with --set, make_plan checks its fields and values first
            _check_space_light(name, info.searchable, args.params)
    if args.out is not None:
        check_out_dir(args.out)


def _check_space_light(name: str, searchable, params) -> None:
    """One method without --set: --params names searchable fields and the search space is not empty (the texts
    of ``search.plan._only`` and ``make_plan``)."""
    import difflib

    from .args import UsageError

    known = list(searchable)
    if params is not None:
        wanted = [p.strip() for p in params.split(",") if p.strip()]
        bad = [p for p in wanted if p not in known]
        if bad:
            close = difflib.get_close_matches(bad[0], known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"--params {bad[0]}: unknown parameter{hint}; searchable: {', '.join(known) or 'none'}")
        known = [f for f in known if f in wanted]
    if not known:
        why = f"{name} declares no searchable field" if not searchable else "every searchable field is fixed by --set"
        raise UsageError(f"empty search space: {why}; search a method with knobs (e.g. --method vflowopt)")


def settings_from_args(args):
    """SearchSettings from parsed flags; a bad value is a :class:`~vtprune.cli.UsageError`."""
    from .bench import parse_data
    from .args import UsageError, check_model_spec, parse_set

    _check_light(args)
    from ..search.study import SearchSettings

    fixed = parse_set(args.set)
    check_model_spec(args.model)  # here too: the search's own checks come after torch is imported
    try:
        tasks, data = parse_data(args.task or "all", args.data)
    except (OSError, ValueError) as err:
        raise UsageError(str(err)) from None
    return SearchSettings(
        model=args.model, method=args.method, keep=args.keep, ratio=args.ratio, objective=args.objective,
        trials=args.trials, data=data, tasks=tasks if (args.task or args.data) else None, study=args.study,
        storage=args.storage, out=args.out, pareto=args.pareto, calib=args.calib, sampler=args.sampler,
        timeout=args.timeout, seed=args.seed, fixed=fixed, params=args.params, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, prompt_style=args.prompt_style, dtype=args.dtype, device=args.device,
        progress=not args.no_progress)


def _summary(result) -> str:
    running = f", {result.running} still running in other workers" if result.running else ""
    lines = [f"study {result.study}: {result.finished} finished trials{running} ({result.storage})"]
    if result.best is None:
        lines.append("no feasible completed trial yet")
    else:
        gain = (f" (defaults: {result.defaults_value:.6f})" if result.defaults_value is not None
                and result.best_trial != 0 else "")
        lines.append(f"best: trial {result.best_trial}, {result.best_value:.6f}{gain}")
    for point in result.front:
        lines.append(f"  front: trial {point['trial']}: {point['value']:.6f} at {point['prefill_ms']:.2f} ms")
    written = [str(v) for k, v in result.files.items() if k != "front"]
    lines.append("wrote " + ", ".join(written) + (f" and {len(result.files['front'])} front configs"
                                                   if result.files.get("front") else ""))
    if result.interrupted:
        lines.append("interrupted: rerun the same command to continue the study")
    return "\n".join(lines)


def run_from_args(args, prog: str = "vtprune search") -> int:
    """Run a parsed command line; 2 (one line on stderr) for bad input, 130 after Ctrl-C, else 0."""
    from .bench import _quiet_transformers
    from .args import UsageError, report

    debug = os.environ.get("VTPRUNE_DEBUG", "") not in ("", "0")
    try:
        settings = settings_from_args(args)
        from ..search.study import run_search
        with _quiet_transformers():
            result = run_search(settings, prog=prog)
    except UsageError as err:
        if debug:
            raise
        return report(prog, err)
    except KeyboardInterrupt:  # the second Ctrl-C: the running trial is left failed, the finished ones stay
        print(f"{prog}: aborted; rerun the same command to continue the study", file=sys.stderr)
        return 130
    print(_summary(result))
    return 130 if result.interrupted else 0



def add(subparsers) -> None:
    """Register ``search`` on the ``vtprune`` parser."""
    p = subparsers.add_parser(
        "search", help="tune a method's hyperparameters with optuna (flow objective or dev accuracy)",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(handler=lambda args: run_from_args(args, prog="vtprune search"))
