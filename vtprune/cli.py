"""The ``vtprune`` command: one argparse sub-command per tool.

    vtprune bench [...]     accuracy + speed of pruning methods on MME / GQA / POPE (see ``vtprune bench -h``)
    vtprune perf [...]      speed, memory and FLOPs against the oracle and the FLOPs ideal (see ``vtprune perf -h``)
    vtprune methods         list the registered methods
    vtprune viz [...]       draw which visual tokens a method keeps (see ``vtprune viz -h``)
    vtprune train-dyvte     train DyVTE's exit routers for a model (see ``vtprune train-dyvte -h``)
    vtprune calibrate-sinks find VAR's sink dimensions of a model (see ``vtprune calibrate-sinks -h``)
    vtprune search [...]    tune a method's hyperparameters with optuna (see ``vtprune search -h``)

Sub-commands with many flags keep them in their package: ``benchmarks/cli.py``, ``benchmarks/perf_cli.py``,
``search/cli.py``, ``training/cli.py`` (train-dyvte, calibrate-sinks).

Adding a sub-command (e.g. ``viz``): write ``_add_<name>(subparsers)`` that creates the sub-parser, adds its
flags and sets ``handler=<function(args) -> exit status>``, then list it in ``COMMANDS``. Heavy imports
(torch, transformers) belong inside the handler, after every check that needs neither, so ``vtprune -h`` and a
bad flag answer at once (``import vtprune`` itself is lazy; ``tests/test_cli_imports.py`` guards this).

User errors (bad flags, files, folders, devices, methods) are one ``<prog>: error: <message>`` line on stderr and
exit status 2, found before any model is loaded: argparse's through :class:`OneLineParser`, later checks by
raising :class:`UsageError` (caught by the handler and printed with :func:`report`). What only the model can
tell (a layer beyond its depth) is checked right after loading it, before any forward (:func:`check_prune`).
These and the ``check_*`` helpers live in :mod:`vtprune.cliargs` (re-exported here): a command's module imports
them from there, never from this module.
Ctrl-C is one ``<prog>: interrupted`` line and exit status 130. Other exceptions keep their traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# re-exported for existing importers: the checks live in cliargs.py, below every command, so that the commands'
# modules import them without importing this module (which imports them: a circle)
from .cliargs import (OneLineParser, UsageError, check_count, check_data_dir, check_method,  # noqa: F401
                      check_model_spec, check_out_dir, check_out_file, check_out_image, check_positive, check_prune,
                      parse_set, report)

__all__ = ["build_parser", "main", "COMMANDS", "UsageError", "report", "parse_set", "OneLineParser"]


def _add_bench(subparsers) -> None:
    from .benchmarks import cli as bench_cli

    p = subparsers.add_parser(
        "bench", help="benchmark pruning methods (accuracy + prefill speed) on MME / GQA / POPE",
        description=bench_cli.DESCRIPTION, epilog=bench_cli.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_cli.add_arguments(p)
    p.set_defaults(handler=lambda args: bench_cli.run_from_args(args, prog="vtprune bench"))


def _run_methods(args) -> int:
    from . import methods as _methods  # noqa: F401  (registers the built-in methods)
    from .registry import list_methods

    for name, desc in list_methods().items():
        print(f"{name:<14} {desc}")
    return 0


def _add_methods(subparsers) -> None:
    p = subparsers.add_parser("methods", help="list the registered pruning methods")
    p.set_defaults(handler=_run_methods)


def load_image(image, flag: str = "--image"):
    """An image file decoded in full, as an RGB PIL image: a truncated or corrupt file, or one over PIL's
    decompression-bomb limit (its warning counts too), is a UsageError before any model loads."""
    from .images import ImageDecodeError, decode_image

    path = Path(image).expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give an image file")
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such file")
    if not path.is_file():  # a device or a pipe such as /dev/null: PIL would read nothing or block
        raise UsageError(f"{flag} {path}: not a regular file; give an image file (PNG or JPEG)")
    try:
        return decode_image(path)
    except ImageDecodeError as err:
        raise UsageError(f"{flag} {err}") from None


def _viz_budget(args) -> dict:
    """``--keep`` / ``--ratio`` as method keywords: required by a method that prunes to a budget, optional for a
    budget-free schedule (TransPrune, VFlowOpt), refused (by the method's own check) where there is no budget
    (DyVTE). A method that removes no token has nothing to draw."""
    from .registry import method_class

    try:
        cls = method_class(args.method)
    except ValueError as err:  # unknown method: the registry's message with close matches
        raise UsageError(str(err)) from None
    if not cls.prunes:
        raise UsageError(f"--method {cls.name}: it removes no visual token (it only modulates attention), so "
                         "there is nothing to draw; choose a pruning method (see vtprune methods)")
    budget = {"keep": args.keep} if args.keep is not None else {} if args.ratio is None else {"ratio": args.ratio}
    if not budget and cls.has_budget and not cls.budget_optional:
        raise UsageError(f"--method {cls.name} prunes to a budget: give --keep N (visual tokens kept per image) "
                         "or --ratio R (the fraction removed, in [0, 1))")
    return budget


def _viz_check(args) -> tuple:
    """Everything about a viz command line that needs no model: files and flags first (no torch needed), then
    the device and the method. Returns (the decoded image, the method keywords)."""
    image = load_image(args.image)
    check_out_image(args.out)
    check_model_spec(args.model)
    hyper = parse_set(args.set)
    from .loading import resolve_device

    resolve_device(args.device)
    hyper.update(_viz_budget(args))
    check_method(args.method, **hyper)
    return image, hyper


def _run_viz(args) -> int:
    prog = "vtprune viz"
    try:
        image, hyper = _viz_check(args)
        from .adapters import get_adapter
        from .loading import load_model

        model, processor, _ = load_model(args.model, dtype=args.dtype, device=args.device)
        try:
            n_visual = get_adapter(model).nominal_tokens
        except TypeError as err:  # a loadable model of an unsupported class
            raise UsageError(f"--model {args.model}: {err}") from None
        if args.keep is not None and args.keep > n_visual:
            raise UsageError(f"--keep {args.keep}: more than the {n_visual} visual tokens an image has for this "
                             f"model; use --keep <= {n_visual} (or --ratio)")
        check_prune(model, args.method, **hyper)  # e.g. --set layer=99 on a 4-layer LLM, before the forward
    except UsageError as err:
        return report(prog, err)
    from .viz import kept_token_pictures

    kept_token_pictures(model, processor, image, args.question, args.method, out=args.out, **hyper)
    print(f"wrote {args.out}")
    return 0


def _add_viz(subparsers) -> None:
    p = subparsers.add_parser(
        "viz", help="draw which visual tokens a method keeps (one panel per stage)",
        description="Draw the image as the model saw it with pruned patches dimmed, one panel per pruning stage.",
    )
    p.add_argument("--model", default=None, help="model folder (default: the shipped tiny LLaVA)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--question", required=True, help="the question asked with the image")
    p.add_argument("--method", required=True, help="method name (see `vtprune methods`)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, help="visual tokens kept per image (needed unless the method has no "
                                                  "budget, as dyvte, or a schedule of its own, as transprune)")
    budget.add_argument("--ratio", type=float, help="fraction of visual tokens removed, in [0, 1)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="method hyperparameter (repeatable)")
    p.add_argument("--out", default="kept.png", help="output image (default kept.png; missing folders are created)")
    p.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(handler=_run_viz)


def _add_train_dyvte(subparsers) -> None:
    from .training import cli as training_cli

    p = subparsers.add_parser("train-dyvte", help=training_cli.TRAIN_HELP, description=training_cli.TRAIN_DESCRIPTION)
    training_cli.add_train_arguments(p)
    p.set_defaults(handler=training_cli.run_train)


def _add_calibrate_sinks(subparsers) -> None:
    from .training import cli as training_cli

    p = subparsers.add_parser("calibrate-sinks", help=training_cli.SINKS_HELP,
                              description=training_cli.SINKS_DESCRIPTION)
    training_cli.add_sinks_arguments(p)
    p.set_defaults(handler=training_cli.run_calibrate_sinks)


def _add_perf(subparsers) -> None:
    from .benchmarks import perf_cli

    p = subparsers.add_parser(
        "perf", help="speed, memory and FLOPs of pruning methods against the oracle and the FLOPs ideal",
        description=perf_cli.DESCRIPTION, epilog=perf_cli.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    perf_cli.add_arguments(p)
    p.set_defaults(handler=lambda args: perf_cli.run_from_args(args, prog="vtprune perf"))


def _add_search(subparsers) -> None:
    from .search import cli as search_cli

    p = subparsers.add_parser(
        "search", help="tune a method's hyperparameters with optuna (flow objective or dev accuracy)",
        description=search_cli.DESCRIPTION, epilog=search_cli.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    search_cli.add_arguments(p)
    p.set_defaults(handler=lambda args: search_cli.run_from_args(args, prog="vtprune search"))


# name -> function that registers the sub-command
COMMANDS = {
    "bench": _add_bench,
    "methods": _add_methods,
    "viz": _add_viz,
    "train-dyvte": _add_train_dyvte,
    "calibrate-sinks": _add_calibrate_sinks,
    "perf": _add_perf,
    "search": _add_search,
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="vtprune", description="Training-free visual-token pruning for HF VLMs.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS.values():
        add(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:  # no command given: a user error like the others, one line
        parser.error(f"give a command: {', '.join(COMMANDS)}")
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:  # commands with something to say about resuming catch it themselves
        print(f"vtprune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    # python -m vtprune.cli: run the package's copy of this module, whose UsageError is the one the other modules
    # raise (this __main__ copy has a class of its own, which their errors would slip past)
    from vtprune.cli import main as _main

    raise SystemExit(_main())
