"""Every hook vtprune puts on a model, and their exact removal.

Attention modules get an ordered *chain* of callbacks (``record`` before ``modulate``, then the model's own
attention function), so one layer can be observed and rewritten at once. A callback has the signature of an
attention function with the rest of the chain first: ``fn(next, module, query, key, value, attention_mask,
**kwargs)``; it returns ``next(...)``'s result or its own ``(output, weights)``.
"""

from __future__ import annotations

import functools
from typing import Callable

from .. import compat

ORDER = {"record": 0, "modulate": 1}


class AttentionChain:
    """The callbacks of one attention module, in order; set as the module's ``_vtprune_attention``."""

    def __init__(self):
        self.callbacks: list[tuple[int, int, Callable]] = []

    def add(self, fn: Callable, role: str) -> None:
        self.callbacks.append((ORDER[role], len(self.callbacks), fn))
        self.callbacks.sort(key=lambda c: c[:2])

    def __call__(self, base, module, *args, **kwargs):
        def run(i, *a, **k):
            if i == len(self.callbacks):
                return base(*a, **k)
            return self.callbacks[i][2](functools.partial(run, i + 1), *a, **k)

        return run(0, module, *args, **kwargs)


class HookSet:
    """Owns the handles, attention chains, attention-implementation wrappers and instance attributes one session
    added; :meth:`remove` undoes all of them."""

    def __init__(self):
        self._handles: list = []
        self._chains: list = []  # modules holding a chain
        self._configs: list = []  # configs whose attention implementation was wrapped
        self._attributes: list = []  # (object, name) instance attributes set

    def pre(self, module, fn, with_kwargs: bool = True, prepend: bool = False) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs, prepend=prepend))

    def post(self, module, fn, with_kwargs: bool = False, always_call: bool = False) -> None:
        self._handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs, always_call=always_call))

    def attention(self, module, fn: Callable, role: str) -> None:
        """Add ``fn`` to the attention chain of ``module`` (``role``: "record" or "modulate")."""
        config = module.config
        if not any(c is config for c in self._configs):
            compat.acquire_wrapped_attention(config)
            self._configs.append(config)
        chain = module.__dict__.get("_vtprune_attention")
        if chain is None:
            chain = module._vtprune_attention = AttentionChain()
            self._chains.append(module)
        chain.add(fn, role)

    def wrap(self, obj, name: str, make: Callable[[Callable], Callable]) -> None:
        """Shadow ``obj.name`` by an instance attribute ``make(original)`` (never the class)."""
        original = getattr(obj, name, None)
        if original is None:
            return
        wrapper = make(original)
        wrapper.vtprune_wrapper = True
        setattr(obj, name, wrapper)
        self._attributes.append((obj, name))

    def remove(self) -> None:
        for obj, name in reversed(self._attributes):
            if getattr(obj.__dict__.get(name), "vtprune_wrapper", False):
                delattr(obj, name)
        self._attributes.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module in self._chains:
            module.__dict__.pop("_vtprune_attention", None)
        self._chains.clear()
        for config in reversed(self._configs):
            compat.release_wrapped_attention(config)
        self._configs.clear()
