"""Public entry points: ``prune``, ``unprune``, ``pruned``, ``list_methods``."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

from .adapters import get_adapter
from .errors import PruneError
from .registry import list_methods, make_method
from .session import Session


def _load_config(path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"vtprune: config file {os.fspath(p)!r} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict) or "method" not in data:
        raise PruneError(f"vtprune: config {os.fspath(p)!r} must be a mapping with a 'method' key")
    return data


def prune(model, method: str | None = None, *, config=None, **kwargs):
    """Install a pruning method on ``model`` (in place) and return it.

    ``ratio`` = fraction of each image's visual tokens removed, in [0, 1); ``keep`` = visual tokens kept per
    image (for the model's standard image; anyres images scale it). Other keywords are the method's
    hyperparameters. ``config`` is a YAML file with ``method:`` and keyword entries (keywords given here
    override it). A model can hold one method at a time: pruning an already pruned model raises; call
    :func:`unprune` first.
    """
    if config is not None:
        data = _load_config(config)
        cfg_method = data.pop("method")
        if method is not None and method != cfg_method:
            raise PruneError(f"vtprune: method {method!r} conflicts with {cfg_method!r} in {config}")
        method = cfg_method
        data.pop("model", None)
        kwargs = {**data, **kwargs}
    if method is None:
        raise PruneError("vtprune: name a method, e.g. vtprune.prune(model, 'fastv', ratio=0.75); see vtprune.list_methods()")
    existing = getattr(model, "vtprune", None)
    if isinstance(existing, Session):
        raise PruneError(
            f"vtprune: this model is already pruned with {existing.method.name!r}; stacking methods is not supported. "
            "Call vtprune.unprune(model) first."
        )
    adapter = get_adapter(model)
    method_obj = make_method(method, **kwargs)
    if method_obj.keep is not None and method_obj.keep > adapter.nominal_tokens:
        raise PruneError(
            f"vtprune: keep={method_obj.keep} is more than the {adapter.nominal_tokens} visual tokens an image has "
            f"for this model; use keep <= {adapter.nominal_tokens}"
        )
    session = Session(model, adapter, method_obj)
    session.install()
    model.vtprune = session
    return model


def unprune(model):
    """Remove vtprune from ``model``: hooks, attention wrappers and state. The model behaves exactly as before."""
    session = getattr(model, "vtprune", None)
    if not isinstance(session, Session):
        warnings.warn("vtprune.unprune: the model is not pruned; nothing to do", stacklevel=2)
        return model
    session.remove()
    return model


@contextlib.contextmanager
def pruned(model, method: str | None = None, **kwargs):
    """``with vtprune.pruned(model, "random", ratio=0.5): ...`` — pruned inside, restored on exit (also on error)."""
    prune(model, method, **kwargs)
    try:
        yield model
    finally:
        if isinstance(getattr(model, "vtprune", None), Session):
            unprune(model)


__all__ = ["prune", "unprune", "pruned", "list_methods"]
