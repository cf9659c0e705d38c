"""One place for budget semantics: ``ratio`` (fraction of an image's visual tokens removed) or ``keep``
(visual tokens kept per image). Every method and model family goes through :func:`tokens_to_keep`."""

from __future__ import annotations

import math
import numbers

from .errors import ConfigError


def _is_bool(value) -> bool:
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def validate_budget(ratio: float | None, keep: int | None, method: str = "") -> None:
    """Raise ConfigError unless exactly one budget is given and it is in range (numpy scalars are fine); the
    message names ``method`` when given."""
    who = f"vtprune: {method} " if method else "vtprune: "
    if (ratio is None) == (keep is None):
        raise ConfigError(
            f"{who}give exactly one budget: ratio=<fraction of visual tokens removed, in [0, 1)> "
            "or keep=<visual tokens kept per image>; got "
            f"ratio={ratio!r}, keep={keep!r}"
        )
    if ratio is not None:
        if _is_bool(ratio) or not isinstance(ratio, numbers.Real) or not (0.0 <= float(ratio) < 1.0):
            raise ConfigError(
                f"{who}ratio must be a number in [0, 1) (the fraction of visual tokens removed), got {ratio!r}; "
                "use ratio=0 for no pruning"
            )
    if keep is not None:
        if _is_bool(keep) or not isinstance(keep, numbers.Integral) or keep <= 0:
            raise ConfigError(f"{who}keep must be a positive integer (visual tokens kept per image), got {keep!r}")


def check_keep(keep: int | None, nominal: int, method: str = "", where: str = "") -> None:
    """Raise ConfigError when ``keep`` (per standard image) is more than the ``nominal`` tokens it has; the message
    names ``method`` and ``where`` (e.g. its pipeline entry)."""
    if keep is not None and keep > nominal:
        who = f"{method} " if method else ""
        raise ConfigError(
            f"vtprune: {who}keep={keep} is more than the {nominal} visual tokens an image has for this model; "
            f"use keep <= {nominal} (or ratio=...){where}"
        )


def tokens_to_keep(n_tokens: int, ratio: float | None, keep: int | None, reference: int | None = None,
                   method: str = "") -> int:
    """Visual tokens to keep for one image of ``n_tokens`` tokens.

    ``keep`` is an absolute count for a ``reference``-token image (the model's nominal count, e.g. 576 for
    LLaVA-1.5); images with a different count (LLaVA-NeXT anyres) get the same fraction. ``ratio`` keeps
    ``round(n_tokens * (1 - ratio))``, at least 1. ``method`` names the method in the error for a ``keep`` above
    ``reference``. ``reference=None`` (dynamic resolution, Qwen-VL): ``keep`` per image, capped at ``n_tokens``.
    """
    if ratio is not None:
        return max(1, min(n_tokens, int(round(n_tokens * (1.0 - float(ratio))))))
    if reference is None:
        return max(1, min(n_tokens, int(keep)))
    check_keep(keep, reference, method)
    if n_tokens == reference:
        return keep
    return max(1, min(n_tokens, int(math.floor(n_tokens * keep / reference + 0.5))))
