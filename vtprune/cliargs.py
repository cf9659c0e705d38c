"""Command-line argument checks shared by every ``vtprune`` command and by the tools that check their own
settings (eval, perf, search, training): :class:`UsageError` and the ``check_*`` helpers. It is the bottom of the
tools: it imports no tool and no command. A ``UsageError`` becomes one ``<prog>: error: <message>`` line on stderr
with exit status 2, found before any model is loaded; :func:`check_prune` checks what only the model can tell,
right after loading it. What only the command line needs (``OneLineParser``, ``report``, ``parse_set``) is in
:mod:`vtprune.cli.args`, which re-exports these, as does :mod:`vtprune.cli` (``from vtprune.cli import
UsageError`` keeps working).

Only the standard library at import: torch and PIL are imported inside the checks that need them, so
``vtprune -h`` and a bad flag answer at once (``tests/test_cli_imports.py``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["UsageError", "check_data_dir", "check_method", "check_prune", "check_count", "check_positive",
           "check_out_dir", "check_out_file", "check_out_image", "check_model_spec"]


class UsageError(ValueError):
    """Bad command-line input (a flag value, file or folder): printed as one ``<prog>: error:`` line, exit 2."""


def check_data_dir(data, flag: str = "--data") -> None:
    """A data folder flag (None: not given) names an existing folder."""
    if data is not None and not Path(data).is_dir():
        raise UsageError(f"{flag} {data}: not a folder (a GQA- or MME-format folder)")


def check_method(name: str, **kwargs):
    """The method ``name`` built with ``kwargs`` (fields and budget checked without a model)."""
    from . import methods as _methods  # noqa: F401  (registers the built-in methods)
    from .registry import make_method

    try:
        return make_method(name, **kwargs)
    except (TypeError, ValueError) as err:  # unknown method or field, bad value, bad budget
        raise UsageError(str(err)) from err


def check_prune(model, method, **kwargs) -> None:
    """Prune ``model`` as ``vtprune.prune(model, method, **kwargs)`` would and unprune it at once, with no forward
    run: what this model refuses (a layer beyond its depth, missing routers) is a UsageError (prune's message).
    The model is left unpruned either way."""
    from .api import prune, unprune
    from .errors import PruneError

    try:
        prune(model, method, **kwargs)
    except PruneError as err:  # ConfigError included; a refused prune leaves no session on the model
        raise UsageError(str(err)) from None
    unprune(model)


def check_count(value, flag: str, low: int = 1) -> None:
    """A whole-number flag (None: not given) is at least ``low``; else a UsageError."""
    if value is not None and value < low:
        raise UsageError(f"{flag} {value}: must be >= {low}")


def check_positive(value, flag: str, fix: str = "") -> None:
    """A number flag (None: not given) is finite and > 0; else a UsageError (``fix`` is appended to it)."""
    if value is not None and not (math.isfinite(value) and value > 0):  # nan compares false, so it fails too
        raise UsageError(f"{flag} {value:g}: must be a finite number > 0{fix}")


def _probe_writable(path: Path, flag: str, what: str, shown: Path | None = None) -> None:
    """``path`` (not yet existing parts allowed: they get created) can be written; else a UsageError naming
    ``shown`` (default ``path``: the flag's value)."""
    import tempfile

    shown = path if shown is None else shown
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{flag} {shown}: {ancestor} is a file, so no {what} can be created under it; "
                         "choose another path")
    try:
        tempfile.TemporaryFile(dir=ancestor).close()
    except OSError as err:
        raise UsageError(f"{flag} {shown}: cannot write in {ancestor} ({err.strerror or err}); "
                         "choose a writable location") from None


def check_out_dir(out, flag: str = "--out") -> Path:
    """An output folder that exists or can be created, and can be written."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: is a file; give a folder (it is created if missing)")
    _probe_writable(path, flag, "folder")
    return path


def check_out_file(out, flag: str = "--out", example: str = "out.yaml") -> Path:
    """An output file path: not a folder, in a folder that exists or can be created, and can be written."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file name such as {path / example}")
    _probe_writable(path.parent, flag, "file", shown=path)
    return path


def check_out_image(out, flag: str = "--out") -> Path:
    """An output image path: :func:`check_out_file` with a suffix PIL can save."""
    from PIL import Image

    path = Path(out).expanduser()
    if not path.is_dir() and path.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"{flag} {path}: unknown image type {path.suffix or '(no extension)'!r}; use .png or .jpg")
    return check_out_file(path, flag, example="kept.png")


def check_model_spec(spec) -> None:
    """``--model``: None, an existing folder or something shaped like a hub id (``org/name``)."""
    if spec is None:
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise UsageError(f"--model {spec}: is a file; give the model folder (with config.json)")
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1 or os.sep != "/" and os.sep in spec:
        raise UsageError(f"--model {spec}: no such folder (and not a hub id like org/name)")
