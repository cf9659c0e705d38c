"""The bench CLI (``cli.py``, ``python -m vtprune.benchmarks``) and the perf suite. The benchmark tasks, the runner
and model loading moved to :mod:`vtprune.eval` and :mod:`vtprune.loading` (Layout v3); their old modules here
(``runner``, ``mme``, ``gqa``, ``pope``, ``prompts``, ``tasks``, ``datachecks``, and ``tiny_llava`` /
``synthetic`` for :mod:`vtprune.embedded`) are aliases kept for existing scripts."""
