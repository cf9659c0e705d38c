"""The benchmark task names, in a module without torch: the command-line parsers check ``--task`` with them."""

TASKS = ("mme", "gqa", "pope")
DEFAULT_TASKS = ("mme", "gqa")  # no --task / --task all without --data (the demo); POPE runs when asked for
