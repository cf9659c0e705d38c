"""``make demo`` runs a fixed method list (its output and time stay put as methods are added), each a registered
token-removing method; a --methods given on the command line wins."""

import vtprune
from vtprune import demo
from vtprune.registry import method_class


def test_the_demo_methods_are_registered_token_removing_methods():
    assert set(demo.DEMO_METHODS) <= set(vtprune.list_methods())
    assert all(method_class(m).prunes for m in demo.DEMO_METHODS)


def test_the_demo_passes_its_methods_unless_given(monkeypatch):
    seen = []
    from vtprune.cli import bench as bench_cli

    monkeypatch.setattr(bench_cli, "main", lambda argv: seen.append(argv) or 0)
    demo.main([])
    demo.main(["--methods", "fastv"])
    assert seen[0][seen[0].index("--methods") + 1] == ",".join(demo.DEMO_METHODS)
    assert seen[1].count("--methods") == 1 and seen[1][seen[1].index("--methods") + 1] == "fastv"
