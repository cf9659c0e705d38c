"""The ``vtprune`` command: one argparse sub-command per tool.

    vtprune bench [...]     accuracy + speed of pruning methods on MME / GQA (see ``vtprune bench -h``)
    vtprune methods         list the registered methods

Adding a sub-command (e.g. ``viz``): write ``_add_<name>(subparsers)`` that creates the sub-parser, adds its
flags and sets ``handler=<function(args) -> exit status>``, then list it in ``COMMANDS``. Heavy imports
(torch, transformers) belong inside the handler so ``vtprune -h`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["build_parser", "main", "COMMANDS"]


def _add_bench(subparsers) -> None:
    from .benchmarks import cli as bench_cli

    p = subparsers.add_parser(
        "bench", help="benchmark pruning methods (accuracy + prefill speed) on MME / GQA",
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


# name -> function that registers the sub-command; `viz` goes here.
COMMANDS = {
    "bench": _add_bench,
    "methods": _add_methods,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtprune", description="Training-free visual-token pruning for HF VLMs.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS.values():
        add(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return int(handler(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
