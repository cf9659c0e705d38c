"""``python -m vtprune.benchmarks [...]`` == ``vtprune bench [...]`` (also the module torchrun launches)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
