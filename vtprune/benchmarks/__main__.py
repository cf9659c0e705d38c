"""``python -m vtprune.benchmarks [...]`` == ``vtprune bench [...]`` (also the module torchrun launches)."""

from ..cli.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
