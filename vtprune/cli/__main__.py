"""``python -m vtprune.cli [...]`` == ``vtprune [...]``."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
