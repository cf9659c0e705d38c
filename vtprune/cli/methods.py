"""``vtprune methods``: list the registered pruning methods, one line each (name and description)."""

from __future__ import annotations


def _run_methods(args) -> int:
    from .. import methods as _methods  # noqa: F401  (registers the built-in methods)
    from ..registry import list_methods

    for name, desc in list_methods().items():
        print(f"{name:<14} {desc}")
    return 0


def add(subparsers) -> None:
    """Register ``methods`` on the ``vtprune`` parser."""
    p = subparsers.add_parser("methods", help="list the registered pruning methods")
    p.set_defaults(handler=_run_methods)
