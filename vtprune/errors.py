"""vtprune's exception type: a ValueError whose message names the problem and the fix."""


class PruneError(ValueError):
    """Raised for bad input or a failure inside a pruned forward (the model is restored unpruned first)."""
