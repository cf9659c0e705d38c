"""`vtprune -h` and one-line usage errors import neither torch nor transformers (each costs seconds), and
`import vtprune` loads its heavy exports only when they are used. Each check runs in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "transformers")

# run main(argv) and report its exit status and which heavy modules it imported
RUN_MAIN = """
import json, sys
from vtprune.cli import main
argv = json.loads(sys.argv[1])
try:
    status = main(argv)
except SystemExit as exc:  # argparse's -h and its own errors
    status = exc.code
print(json.dumps({"status": status, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def _python(code: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_building_the_parser_imports_no_torch():
    done = _python("import sys, vtprune.cli as c; c.build_parser(); "
                   f"print([m for m in {HEAVY!r} if m in sys.modules])")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


VIZ = ["--image", "good.png", "--question", "q"]  # written into the test's folder
USAGE = {
    "help": (["-h"], 0),
    "bench help": (["bench", "-h"], 0),
    "bench keep abc": (["bench", "--keep", "abc"], 2),
    "bench keep 0": (["bench", "--keep", "0"], 2),
    "bench ratio 1.5": (["bench", "--ratio", "1.5"], 2),
    "bench decode-tokens -1": (["bench", "--decode-tokens", "-1"], 2),
    "bench missing model": (["bench", "--model", "./no-such-model"], 2),
    "bench missing data": (["bench", "--data", "gqa=./no-such-folder"], 2),
    "bench unknown task": (["bench", "--task", "vqa"], 2),
    "viz missing image": (["viz", "--image", "missing.png", "--question", "q", "--method", "random", "--keep", "4"],
                          2),
    "perf rounds 0": (["perf", "--rounds", "0"], 2),
    "perf keep 0": (["perf", "--keep", "0"], 2),
    "perf missing model": (["perf", "--model", "./no-such-model"], 2),
    "train-dyvte steps 0": (["train-dyvte", "--steps", "0"], 2),
    "train-dyvte missing model": (["train-dyvte", "--model", "./no-such-model"], 2),
    "calibrate-sinks prompts 0": (["calibrate-sinks", "--prompts", "0"], 2),
    "search trials 0": (["search", "--method", "fastv", "--trials", "0"], 2),
    "search timeout 0": (["search", "--method", "fastv", "--timeout", "0"], 2),
    "search missing model": (["search", "--method", "fastv", "--model", "./no-such-model"], 2),
    "no command": ([], 2),
    # the method, its fields and budget, --config files and --arch are checked without torch too (cli/known.py)
    "bench unknown method": (["bench", "--methods", "nosuch"], 2),
    "bench missing config": (["bench", "--config", "/nonexistent.yaml"], 2),
    "bench unknown set field": (["bench", "--set", "nosuch=3", "--methods", "fastv"], 2),
    "viz unknown method": (["viz", *VIZ, "--method", "nosuch", "--keep", "4"], 2),
    "viz no budget": (["viz", *VIZ, "--method", "fastv"], 2),
    "viz keep 0": (["viz", *VIZ, "--method", "fastv", "--keep", "0"], 2),
    "viz keep for dyvte": (["viz", *VIZ, "--method", "dyvte", "--keep", "16"], 2),
    "viz method var": (["viz", *VIZ, "--method", "var"], 2),
    "perf unknown arch": (["perf", "--arch", "nosuch"], 2),
    "perf unknown method": (["perf", "--methods", "nosuch"], 2),
    "perf missing config": (["perf", "--config", "/nonexistent.yaml"], 2),
    "search no budget": (["search", "--method", "fastv"], 2),
    "search unknown method": (["search", "--method", "nosuch", "--keep", "4"], 2),
    "search empty space": (["search", "--method", "random", "--keep", "4"], 2),
    "search unknown params": (["search", "--method", "fastv", "--keep", "4", "--params", "nosuch"], 2),
    "search unwritable out": (["search", "--method", "fastv", "--keep", "4", "--out", "/proc/x"], 2),
}


@pytest.mark.parametrize("case", list(USAGE))
def test_help_and_usage_errors_import_no_torch(tmp_path, case):
    argv, expected = USAGE[case]
    if "good.png" in argv:
        from PIL import Image

        Image.new("RGB", (32, 32), "white").save(tmp_path / "good.png")
    done = _python(RUN_MAIN, json.dumps(argv), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"status": expected, "heavy": []}, done.stderr
    if expected == 2:  # one `<prog>: error: ...` line
        assert len(done.stderr.strip().splitlines()) == 1 and ": error: " in done.stderr, done.stderr


def test_import_vtprune_is_light_and_its_exports_load_on_use():
    code = """
import sys
import vtprune
light = [m for m in %r if m in sys.modules]
from vtprune import Method, register, ConfigError
assert Method.__module__ == "vtprune.methods.base" and callable(register)
assert all(getattr(vtprune, name) is not None for name in vtprune.__all__)
assert callable(vtprune.search) and vtprune.search.__module__ == "vtprune.search"  # the function, not the package
assert "fastv" in vtprune.list_methods()  # the built-in methods are registered with the first heavy export
assert vtprune.methods.FastV.name == "fastv"  # submodules as attributes, as the eager package gave them
print(light)
""" % (HEAVY,)
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_registry_finds_the_built_in_methods_on_its_own():
    """With ``import vtprune`` lazy, a lookup through the registry alone still knows every built-in method."""
    done = _python("import json\n"
                   "from vtprune.registry import list_methods, make_method\n"
                   "assert make_method('fastv', keep=4).name == 'fastv'\n"
                   "print(json.dumps(sorted(list_methods())))")
    assert done.returncode == 0, done.stderr
    assert {"dyvte", "fastv", "flowcut", "var", "visionzip"} <= set(json.loads(done.stdout))
