"""The bench tests' fixtures (tests/benchmarks/conftest.py: one torch thread, a random-init tiny LLaVA checkpoint)
for the tests of vtprune/eval/, which moved here from tests/benchmarks/ with Layout v3."""

from tests.benchmarks.conftest import _one_thread_for_every_bench_test, broken_method, tiny  # noqa: F401
