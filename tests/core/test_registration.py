"""``register`` and the method table sit below vtprune/methods/ (each method file registers itself there);
``vtprune.registry`` keeps every name working on the same table."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import vtprune
from vtprune import registry
from vtprune.core import registration
from vtprune.methods.base import Method

ROOT = Path(__file__).resolve().parents[2]


def test_the_registry_names_are_the_registration_ones():
    assert registry.register is registration.register is vtprune.register
    assert registry._METHODS is registration._METHODS  # tests and tools pop entries through vtprune.registry


def test_a_method_registered_below_is_found_by_the_lookups():
    @registration.register
    @dataclass
    class _Below(Method):
        name: ClassVar[str] = "_test_registered_below"
        description: ClassVar[str] = "registered through vtprune.core.registration"

    try:
        assert registry.method_class("_test_registered_below") is _Below
        assert registry.list_methods()["_test_registered_below"] == _Below.description
    finally:
        registration._METHODS.pop("_test_registered_below")


def test_the_built_in_methods_register_with_the_module_below_not_the_lookups():
    """A method file importing ``vtprune.registry`` would close the registry <-> methods circle again."""
    for path in sorted((ROOT / "vtprune" / "methods").glob("*.py")):
        text = path.read_text()
        assert "from ..registry import" not in text, f"{path.name}: register with ..core.registration"


def test_the_registration_module_imports_no_torch_and_no_method():
    code = ("import sys, vtprune.core.registration as r; "
            "print([m for m in ('torch', 'vtprune.methods', 'vtprune.registry') if m in sys.modules], len(r._METHODS))")
    done = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "0"]
