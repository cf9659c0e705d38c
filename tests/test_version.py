"""``__version__`` lives in the foundation module vtprune/_version.py: the root re-exports it and results.json
reads it from there, so no tool imports the facade."""

from __future__ import annotations

import tomllib
from pathlib import Path

import vtprune
from vtprune import _version

ROOT = Path(__file__).resolve().parent.parent


def test_the_root_re_exports_the_foundation_version():
    assert vtprune.__version__ is _version.__version__


def test_the_version_is_the_packaged_one():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _version.__version__ == project["version"]
