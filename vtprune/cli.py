"""The ``vtprune`` command: one argparse sub-command per tool.

    vtprune bench [...]     accuracy + speed of pruning methods on MME / GQA (see ``vtprune bench -h``)
    vtprune methods         list the registered methods
    vtprune viz [...]       draw which visual tokens a method keeps (see ``vtprune viz -h``)

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


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)  # ints, floats, booleans and strings as YAML reads them


def _run_viz(args) -> int:
    from .benchmarks.runner import load_model
    from .errors import PruneError
    from .viz import kept_token_pictures

    hyper = {}
    for item in args.set or ():
        key, sep, value = item.partition("=")
        if not sep:
            print(f"vtprune viz: error: --set expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        hyper[key] = _parse_value(value)
    if args.keep is not None:
        hyper["keep"] = args.keep
    if args.ratio is not None:
        hyper["ratio"] = args.ratio
    model, processor, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    try:
        kept_token_pictures(model, processor, args.image, args.question, args.method, out=args.out, **hyper)
    except (PruneError, TypeError, ValueError) as err:
        print(f"vtprune viz: error: {err}", file=sys.stderr)
        return 2
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
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--keep", type=int, help="visual tokens kept per image")
    budget.add_argument("--ratio", type=float, help="fraction of visual tokens removed")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="method hyperparameter (repeatable)")
    p.add_argument("--out", default="kept.png", help="output PNG (default kept.png)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.set_defaults(handler=_run_viz)


# name -> function that registers the sub-command
COMMANDS = {
    "bench": _add_bench,
    "methods": _add_methods,
    "viz": _add_viz,
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
