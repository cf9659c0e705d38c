"""What only the command line needs: :class:`OneLineParser` (argparse errors as one line), :func:`report` (a
:class:`UsageError` as the line ``<prog>: error: <message>``, exit status 2) and :func:`parse_set` (``--set
KEY=VALUE``). The checks that the tools (eval, perf, search, training) share with the commands, ``UsageError`` and
the ``check_*`` helpers, live below the tools in :mod:`vtprune.cliargs` and are re-exported here, so a command's
module imports all its argument helpers from this one module. Only the standard library at import (yaml is
imported inside :func:`parse_set`), so ``vtprune -h`` and a bad flag answer at once.
"""

from __future__ import annotations

import argparse
import sys

from ..cliargs import (UsageError, check_count, check_data_dir, check_method, check_model_spec,  # noqa: F401
                       check_out_dir, check_out_file, check_out_image, check_positive, check_prune)

__all__ = ["UsageError", "report", "OneLineParser", "parse_set", "check_data_dir", "check_method", "check_prune",
           "check_count", "check_positive", "check_out_dir", "check_out_file", "check_out_image", "check_model_spec"]


def report(prog: str, err) -> int:
    """Print ``err`` as the single line ``<prog>: error: <message>`` on stderr; returns exit status 2."""
    message = " ".join(str(err).split()).removeprefix(f"{prog}: ").removeprefix("vtprune bench: ")
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), like the checks run after parsing."""

    def error(self, message):
        raise SystemExit(report(self.prog, f"{message} (see {self.prog} -h)"))


def _parse_value(text: str):
    """A ``--set`` value as YAML reads it (ints, floats, booleans, strings); ``1e-3`` is a float too."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_set(items, reserved=("keep", "ratio")) -> dict:
    """``--set KEY=VALUE`` entries -> {key: value}; the budget keys have their own flags."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set expects KEY=VALUE with a method field as KEY (e.g. --set layer=3), got {item!r}")
        if key in reserved:
            raise UsageError(f"--set {key}=...: give the budget with --{key} instead")
        out[key] = _parse_value(value.strip())
    return out
