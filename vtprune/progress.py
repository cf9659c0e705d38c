"""One progress bar for every command: a tqdm bar on stderr, drawn only in an interactive terminal.

CI logs and redirected runs (stdout or stderr not a terminal) get no bar: carriage-return redraws make those logs
unreadable. Commands that want a line per unit of work there print it themselves.
"""

from __future__ import annotations

import sys

__all__ = ["interactive", "progress_bar"]


def interactive() -> bool:
    """True when both stdout and stderr are terminals (a person is watching, not a log)."""
    return _isatty(sys.stdout) and _isatty(sys.stderr)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0):
    """A tqdm bar over ``total`` units on stderr, or None when ``enabled`` is False or no one watches."""
    if not (enabled and interactive()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)
