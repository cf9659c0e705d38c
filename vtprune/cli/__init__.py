"""The ``vtprune`` command (also ``python -m vtprune.cli``): :func:`main` parses the command line with
:func:`build_parser` and dispatches to one sub-command, each in a module of its own here (``bench``, ``perf``,
``search``, ``viz``, ``train_dyvte``, ``calibrate_sinks``, ``methods``, ``serve``; ``vtprune <command> -h`` describes it).
Adding a sub-command: write ``vtprune/cli/<name>.py`` with ``add(subparsers)``, which creates the sub-parser, adds
its flags and sets ``handler=<function(args) -> exit status>``, then list ``<name>.add`` in :data:`COMMANDS`.
A command module imports its argument helpers from :mod:`.args` (never from this package, which imports every
command); nothing outside ``vtprune/cli/`` imports it but the aliases at the old paths and the launchers
(``tests/test_layers.py``). Heavy imports (torch, transformers) belong inside the handler, after every check that
needs neither, so ``vtprune -h`` and a bad flag answer at once (``tests/test_cli_imports.py``). User errors (bad
flags, files, folders, devices, methods) are one ``<prog>: error: <message>`` line on stderr and exit status 2,
found before any model is loaded: argparse's through :class:`OneLineParser`, later checks by raising
:class:`UsageError` (caught by the handler and printed with :func:`report`); what only the model can tell (a
layer beyond its depth) is checked right after loading it, before any forward (:func:`check_prune`). Ctrl-C is
one ``<prog>: interrupted`` line and exit status 130. Other exceptions keep their traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import bench, calibrate_sinks, lmms_tasks, methods, perf, search, serve, train_dyvte, viz
# re-exported for existing importers (``from vtprune.cli import UsageError``, ``check_*``, ``load_image``)
from .args import (OneLineParser, UsageError, check_count, check_data_dir, check_method,  # noqa: F401
                   check_model_spec, check_out_dir, check_out_file, check_out_image, check_positive, check_prune,
                   parse_set, report)
from .viz import load_image  # noqa: F401

__all__ = ["build_parser", "main", "COMMANDS", "UsageError", "report", "parse_set", "OneLineParser"]


# name -> function that registers the sub-command (each module's ``add``), in the order ``vtprune -h`` lists them
COMMANDS = {
    "bench": bench.add,  # accuracy + speed of pruning methods on MME / GQA / POPE
    "methods": methods.add,  # list the registered methods
    "viz": viz.add,  # draw which visual tokens a method keeps
    "train-dyvte": train_dyvte.add,  # train DyVTE's exit routers for a model
    "calibrate-sinks": calibrate_sinks.add,  # find VAR's sink dimensions of a model
    "perf": perf.add,  # speed, memory and FLOPs against the oracle and the FLOPs ideal
    "search": search.add,  # tune a method's hyperparameters with optuna
    "lmms-tasks": lmms_tasks.add,  # the folder of the offline lmms-eval task pack
    "serve": serve.add,  # vLLM's OpenAI-compatible server, every image pruned to k tokens (vLLM environment)
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="vtprune", description="Training-free visual-token pruning for HF VLMs.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS.values():
        add(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:  # no command given: a user error like the others, one line
        parser.error(f"give a command: {', '.join(COMMANDS)}")
    if extra and not getattr(args, "pass_unknown", False):  # only `serve` hands unknown flags on (to vLLM)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int((handler(args, extra) if getattr(args, "pass_unknown", False) else handler(args)) or 0)
    except KeyboardInterrupt:  # commands with something to say about resuming catch it themselves
        print(f"vtprune {args.command}: interrupted", file=sys.stderr)
        return 130

