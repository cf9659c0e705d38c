"""``--model_args`` of ``lmms-eval --model vtprune``: split into the host class's keywords and vtprune's, and
checked before anything is loaded.

lmms-eval parses ``--model_args`` itself (``utils.simple_parse_args_string``: ``true``/``false`` become bools,
digit strings ints, other numbers floats, the rest strings), so the values arrive typed. vtprune's keys are
``method`` (``none`` or absent: unpruned), ``config`` (a shipped name or a YAML path), ``evict_early_kv`` and the
method's fields (``ratio``, ``keep``, ``layer``, ...); every other key belongs to the lmms-eval class that loads
the checkpoint (``pretrained``, ``dtype``, ``device_map``, ...).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field

OWN_KEYS = ("method", "config", "evict_early_kv")
NO_METHOD = (None, "", "none", "vanilla")


class PluginExit(SystemExit):
    """A vtprune plugin error that ends the lmms-eval run with a non-zero status. lmms-eval 0.7.3 catches every
    ``Exception`` of a run, prints it and exits 0 (serving_eval.md §6), so a bad ``--model_args`` or a failed
    generation is a ``SystemExit``: ``code`` 2 for a usage error, 1 for a failure during the run. The message is
    printed to stderr when raised (one line for usage errors)."""

    def __init__(self, message: str, code: int):
        super().__init__(code)
        self.message = message
        print(message, file=sys.stderr, flush=True)

    def __str__(self) -> str:
        return self.message


def usage_error(message: str) -> PluginExit:
    return PluginExit(f"lmms-eval --model vtprune: error: {message}", 2)


@dataclass
class PruneArgs:
    """What ``vtprune.prune`` gets: no method (unpruned), a method with fields, or a config."""
    method: str | None = None
    config: str | None = None
    evict_early_kv: bool | None = None
    fields: dict = field(default_factory=dict)

    @property
    def prunes(self) -> bool:
        return self.method is not None or self.config is not None

    def describe(self) -> str:
        if not self.prunes:
            return "unpruned"
        parts = [f"method={self.method}"] if self.method else []
        parts += [f"config={self.config}"] if self.config else []
        parts += [f"{k}={v}" for k, v in sorted(self.fields.items())]
        return ",".join(parts)


def host_keywords(host_cls) -> set[str]:
    """The keywords the host lmms-eval class's ``__init__`` names (its ``**kwargs`` excluded)."""
    params = inspect.signature(host_cls.__init__).parameters.values()
    return {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def split_args(kwargs: dict, host_cls) -> tuple[PruneArgs, dict]:
    """(vtprune's part, the host's part) of the keywords ``lmms-eval`` passes to the model class."""
    host = host_keywords(host_cls)
    own = {k: kwargs[k] for k in OWN_KEYS if k in kwargs}
    fields = {k: v for k, v in kwargs.items() if k not in host and k not in OWN_KEYS}
    rest = {k: v for k, v in kwargs.items() if k in host}
    method = own.get("method")
    if isinstance(method, str) and method.lower() in NO_METHOD:
        method = None
    return PruneArgs(method, own.get("config"), own.get("evict_early_kv"), fields), rest


def check_prune_args(args: PruneArgs) -> None:
    """Build the method(s) as ``vtprune.prune`` will, with no model: an unknown method or field, a bad value or
    budget (``ratio=1.5``, both ``keep`` and ``ratio``) is one :class:`PluginExit` line (status 2)."""
    from ..errors import ConfigError

    if not args.prunes:
        if args.fields or args.evict_early_kv is not None:
            given = sorted(args.fields) + (["evict_early_kv"] if args.evict_early_kv is not None else [])
            raise usage_error(f"{', '.join(given)} given without method= (e.g. method=fastv,ratio=0.75); "
                              f"method=none runs unpruned and takes no method fields")
        return
    try:
        _build_methods(args)
    except ConfigError as err:  # unknown method / field, bad value or budget, bad config file
        raise usage_error(str(err)) from None


def _build_methods(args: PruneArgs) -> None:
    from .. import api
    from ..registry import make_method

    if args.evict_early_kv is not None:
        api._check_evict_early_kv(args.evict_early_kv)  # the check prune() runs on it
    if args.config is not None:
        api._methods_from_config(args.config, args.method, args.fields)  # what prune(config=...) builds
    else:
        make_method(args.method, **args.fields)
