"""The benchmarks, one module each (``mme``, ``gqa``, ``pope``: loader, answer parsing, scorer), with the shared
prompt conventions (``prompts``) and loader checks (``datachecks``). This package itself holds the task names
without torch: the command-line parsers check ``--task`` with them."""

TASKS = ("mme", "gqa", "pope")
DEFAULT_TASKS = ("mme", "gqa")  # no --task / --task all without --data (the demo); POPE runs when asked for
