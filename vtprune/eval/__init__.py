"""Accuracy evaluation of pruned models (``vtprune bench``): ``tasks/`` holds one module per benchmark (MME, GQA,
POPE: loader, prompt conventions, scorer), ``checks`` and ``sweep`` the configurations of a run and their checks,
``data`` the task data, ``answer`` the answering loop, ``shard`` the ``torchrun`` sharding, ``run`` the runner,
``results`` the result assembly and ``report`` the table, CSV, JSON and plot. Importing the package (and
``checks`` / ``tasks``) costs no torch: the command line checks its flags with them before anything heavy."""
