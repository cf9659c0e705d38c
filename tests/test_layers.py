"""The layer diagram of docs/architecture.md ("Layers"), checked on the source: every module of vtprune/ is
parsed with ``ast`` (module-level imports, lazy imports inside functions and ``TYPE_CHECKING`` blocks, relative
imports resolved) and the test fails on an import circle among vtprune modules or an import that goes up the
diagram. Nothing is imported: a module that does not import still gets checked."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vtprune"

# The old paths of the sub-command modules, now aliases of their vtprune/cli/ modules (Layout v3), and the launchers
# of a command: the only modules outside vtprune/cli/ that may import vtprune.cli*.
CLI_ALIASES = ("vtprune.benchmarks.cli", "vtprune.benchmarks.perf_cli", "vtprune.search.cli", "vtprune.training.cli")
CLI_LAUNCHERS = ("vtprune.benchmarks.__main__", "vtprune.demo")

# Bottom first. A module may import modules of its own layer and of the layers below. The longest matching prefix
# places a module; the root package ``vtprune`` (the public facade: it re-exports api, methods and the search
# function) matches only itself. Layout v3 (issue 24) moves the marked entries; tighten this list as it does.
LAYERS = (
    ("foundation", ("vtprune._version", "vtprune._parts", "vtprune.errors", "vtprune.compat",
                    "vtprune.progress", "vtprune.images", "vtprune.kernels",
                    "vtprune.budget", "vtprune.space")),
    ("adapters", ("vtprune.adapters",)),
    ("core", ("vtprune.core", "vtprune.methods", "vtprune.registry")),
    ("stages", ("vtprune.stages",)),
    ("api", ("vtprune.session", "vtprune.api")),
    # UsageError and the check_* helpers the tools raise too: below them, so no tool imports vtprune.cli
    ("tool-args", ("vtprune.cliargs",)),
    ("tool-libs", ("vtprune.benchmarks", "vtprune.embedded", "vtprune.eval", "vtprune.loading", "vtprune.perf")),
    ("tools", ("vtprune.search", "vtprune.training", "vtprune.viz", "vtprune.lmms", "vtprune.vllm")),
    ("entry", ("vtprune", "vtprune.cli", "vtprune.demo", "vtprune.benchmarks.__main__") + tuple(CLI_ALIASES)),
)

# importer -> imported: edges that close a circle today; each says which Layout v3 move removes it. The circle
# check ignores exactly these edges, so any other circle fails, and an entry whose edge is gone fails too.
ALLOWED_CIRCLE_EDGES: dict[tuple[str, str], str] = {}

# importer -> imported: imports that go up the diagram today; each says which Layout v3 move removes it.
ALLOWED_UP_EDGES: dict[tuple[str, str], str] = {}


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package ``__init__``) for every module under vtprune/."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _targets(node, name: str, is_pkg: bool, known) -> set[str]:
    """The vtprune modules one import statement loads: ``from pkg import sub`` is the module pkg.sub,
    ``from pkg import name`` is pkg; ``import a.b.c`` is the deepest module of a.b.c that exists."""
    if isinstance(node, ast.Import):
        found = set()
        for alias in node.names:
            target = alias.name
            while target and target not in known:
                target = target.rpartition(".")[0]
            found.add(target)
        return found - {""}
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = name.split(".") if is_pkg else name.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    if base != "vtprune" and not base.startswith("vtprune."):
        return set()
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}


def import_graph() -> dict[str, set[str]]:
    """Module -> the vtprune modules it imports anywhere in its file (self-imports left out)."""
    known = modules()
    graph = {}
    for name, (path, is_pkg) in known.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found |= _targets(node, name, is_pkg, known)
        graph[name] = found - {name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root), on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child), on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while not component or component[-1] != node:
                    component.append(stack.pop())
                    on_stack.discard(component[-1])
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def layer_of(name: str) -> int:
    """Index in LAYERS of the longest prefix matching ``name`` (the root prefix matches only itself)."""
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = name == prefix or (prefix != "vtprune" and name.startswith(prefix + "."))
            if matches and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{name} is in no layer: add it to LAYERS here and to docs/architecture.md"
    return rank


def test_the_parser_sees_relative_lazy_and_type_checking_imports():
    graph = import_graph()
    assert "vtprune.methods" in graph["vtprune.registry"]  # lazy, inside _registered(): `from . import methods`
    assert "vtprune.methods.base" in graph["vtprune.core.plan"]  # relative, two dots
    assert "vtprune.compat" in graph["vtprune.stages.llm"]  # `from .. import compat`: the module, not the package
    assert "vtprune.loading" in graph["vtprune.cli.viz"]  # lazy, inside a function


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert circles(graph) == [["a", "b", "c"]]


def test_no_import_circle():
    graph = import_graph()
    for importer, imported in ALLOWED_CIRCLE_EDGES:
        assert imported in graph.get(importer, ()), f"{importer} no longer imports {imported}: drop its allow entry"
        graph[importer] = graph[importer] - {imported}
    found = circles(graph)
    assert not found, "import circles among vtprune modules (see the Layers section of docs/architecture.md):\n" + \
        "\n".join(" <-> ".join(c) for c in found)


def test_every_module_is_placed_in_the_diagram():
    for name in modules():
        layer_of(name)


def test_no_import_goes_up_the_diagram():
    graph = import_graph()
    up = sorted((a, b) for a, targets in graph.items() for b in targets
                if layer_of(b) > layer_of(a) and (a, b) not in ALLOWED_UP_EDGES)
    assert not up, "imports going up the layer diagram (docs/architecture.md, Layers):\n" + "\n".join(
        f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})" for a, b in up)
    for importer, imported in ALLOWED_UP_EDGES:
        assert imported in graph.get(importer, ()), f"{importer} no longer imports {imported}: drop its allow entry"


def test_nothing_outside_the_cli_package_imports_it():
    graph = import_graph()
    in_cli = lambda name: name == "vtprune.cli" or name.startswith("vtprune.cli.")  # noqa: E731
    found = sorted((a, b) for a, targets in graph.items() for b in targets
                   if in_cli(b) and not in_cli(a) and a not in CLI_ALIASES + CLI_LAUNCHERS)
    assert not found, "modules outside vtprune/cli/ importing it (import from vtprune.cliargs instead):\n" + \
        "\n".join(f"{a} -> {b}" for a, b in found)
    for name in CLI_ALIASES + CLI_LAUNCHERS:  # an entry whose import is gone fails, so the list stays tight
        assert any(in_cli(b) for b in graph[name]), f"{name} no longer imports vtprune.cli: drop it from the list"
