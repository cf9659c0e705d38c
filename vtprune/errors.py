"""vtprune's exception types: ValueErrors whose message names the problem and the fix."""


class PruneError(ValueError):
    """Raised for bad input or a failure inside a pruned forward (the model is restored unpruned first)."""


class ConfigError(PruneError):
    """A bad method hyperparameter or config file; raised before the model is touched."""


class UnknownFieldError(ConfigError, TypeError):
    """An unknown method keyword. Also a TypeError, as Python raises for a bad keyword (and vtprune did)."""


class ConfigNotFoundError(ConfigError, FileNotFoundError):
    """A config that is neither a file nor a shipped name. Also a FileNotFoundError (what vtprune raised)."""
