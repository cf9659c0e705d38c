"""The sweep settings checked without torch (it costs seconds): bad ``--keep`` / ``--ratio`` values and counts.
Shared by the bench CLI (before anything heavy is imported) and the runner (:mod:`vtprune.eval.sweep`)."""

from __future__ import annotations

from typing import Sequence


def budget_errors(keeps: Sequence, ratios: Sequence) -> str | None:
    """The message for the first bad ``--keep`` / ``--ratio`` values by ``vtprune.prune``'s rule
    (:func:`vtprune.budget.validate_budget`), or None. Shared by the bench runner."""
    from ..budget import validate_budget

    def bad(**budget) -> bool:
        try:
            validate_budget(budget.get("ratio"), budget.get("keep"))
        except ValueError:
            return True
        return False

    bad_keep = [k for k in keeps if bad(keep=k)]
    if bad_keep:
        return (f"--keep {','.join(map(str, bad_keep))}: must be positive whole numbers "
                "(visual tokens kept per image)")
    bad_ratio = [r for r in ratios if bad(ratio=r)]  # nan fails too
    if bad_ratio:
        return (f"--ratio {','.join(map(str, bad_ratio))}: must be in [0, 1) (the fraction of visual tokens "
                "removed; 0 = no pruning)")
    return None


# every count flag: (field, flag, lowest value); None (not given) is fine for limit and threads
COUNT_FLAGS = (("limit", "--limit", 1), ("batch_size", "--batch-size", 1),
               ("max_new_tokens", "--max-new-tokens", 1), ("threads", "--threads", 1),
               ("timing_samples", "--timing-samples", 0), ("timing_repeats", "--timing-repeats", 1),
               ("decode_tokens", "--decode-tokens", 0))


def check_counts(settings) -> None:
    """Every count of ``settings`` (parsed flags or BenchSettings: the same names) is a whole number >= its flag's
    lowest value: a negative one is a :class:`UsageError` naming the flag, never clamped to 0."""
    from ..cliargs import check_count

    for name, flag, low in COUNT_FLAGS:
        check_count(getattr(settings, name), flag, low)
