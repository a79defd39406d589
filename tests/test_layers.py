"""Layers point down (docs/design.md): read every module's imports with ``ast`` (nothing is imported)
and check that no module takes a private name from another, that there are no import cycles,
and that the lower layers never reach up.

Imports inside functions count too: a lazy import hides a cycle from Python, not from a reader.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import alignkit

ROOT = Path(alignkit.__file__).resolve().parent

# (modules under this package, may not import this package): docs/design.md's layers, cli → tools →
# train → rewards/generation/models/data/algos → config. ``tools`` holds the commands that use a
# model (infer, compare, pairs, demo) and their shared generator; its ``config`` module is plumbing
# that ``export`` uses too, so it imports nothing above ``alignkit.config``.
TOOL_COMMANDS = ["alignkit.tools.infer", "alignkit.tools.compare", "alignkit.tools.pairs", "alignkit.tools.demo",
                 "alignkit.tools.generator"]
FORBIDDEN = [
    ("alignkit.models", "alignkit.train"),
    ("alignkit.train", "alignkit.report"),
    ("alignkit.train", "alignkit.tools"),
    ("alignkit.generation", "alignkit.train"),
    ("alignkit.algos", "alignkit.train"),
    ("alignkit.data", "alignkit.train"),
    ("alignkit.rewards", "alignkit.train"),
    ("alignkit.runs", "alignkit.train"),
    ("alignkit.export", "alignkit.train"),
    ("alignkit.tools.infer", "alignkit.train"),
    ("alignkit.tools.compare", "alignkit.train"),
    ("alignkit.tools.generator", "alignkit.train"),
    ("alignkit.tools.config", "alignkit.export"),
    ("alignkit.tools.config", "alignkit.runs"),
    # infer and compare share tools/generator.py and runs.py and never import each other; export sits below both.
    ("alignkit.generation", "alignkit.export"),
    ("alignkit.generation", "alignkit.tools"),
    ("alignkit.runs", "alignkit.export"),
    ("alignkit.runs", "alignkit.tools"),
    *[("alignkit.export", command) for command in TOOL_COMMANDS],
    ("alignkit.tools.infer", "alignkit.tools.compare"),
    ("alignkit.tools.compare", "alignkit.tools.infer"),
]


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module (a submodule when ``from pkg import submodule``)
    name: str | None  # the name taken by ``from target import name``
    where: str  # file:line


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def edges_of(module: str, path: Path) -> list[Edge]:
    """Every ``import alignkit...`` / ``from alignkit... import`` in the file, at any depth."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(ROOT.parent)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            out += [Edge(module, a.name, None, where) for a in node.names if a.name.split(".")[0] == "alignkit"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "alignkit":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append(Edge(module, sub, None, where) if sub in MODULES else Edge(module, base, a.name, where))
    return out


EDGES = [e for m, p in MODULES.items() for e in edges_of(m, p)]


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_the_import_reader_sees_the_package():
    taken = {(e.source, e.target, e.name) for e in EDGES}
    assert ("alignkit.tools.compare", "alignkit.runs", "build_spec") in taken
    assert ("alignkit.cli", "alignkit.config", "load_config") in taken  # inside a function
    assert ("alignkit.export", "alignkit.export.merge", None) in {(e.source, e.target, None) for e in EDGES}


def test_no_module_imports_a_private_name_from_another():
    bad = [f"{e.where}: {e.name} from {e.target}" for e in EDGES
           if (e.name and is_private(e.name)) or any(is_private(p) for p in e.target.split("."))]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycles_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for e in EDGES:
        if e.target in MODULES and e.target != e.source:
            graph[e.source].add(e.target)
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize(("layer", "above"), FORBIDDEN, ids=[f"{a}-not-{b}" for a, b in FORBIDDEN])
def test_layers_point_down(layer, above):
    def inside(module: str, package: str) -> bool:
        return module == package or module.startswith(package + ".")

    bad = [f"{e.where}: imports {e.target}" for e in EDGES if inside(e.source, layer) and inside(e.target, above)]
    assert not bad, f"{layer} must not import {above}:\n" + "\n".join(bad)


def test_training_functions_stay_small():
    """The PPO loop reads in ~80 lines, and no training function takes more than ~8
    parameters (a phase takes a typed settings object, not sixteen loose tensors)."""
    too_many, too_long = [], []
    for path in sorted((ROOT / "train").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            args = node.args
            n = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs) - (args.args[:1] != [] and
                                                                                  args.args[0].arg in ("self", "cls"))
            where = f"{path.relative_to(ROOT)}:{node.name}"
            if n > 8:
                too_many.append((where, n))
            if node.end_lineno - node.lineno + 1 > 80:
                too_long.append((where, node.end_lineno - node.lineno + 1))
    assert not too_many, f"functions with more than 8 parameters: {too_many}"
    assert not too_long, f"functions longer than 80 lines: {too_long}"


def test_no_function_in_the_package_is_over_80_lines():
    too_long = [f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
                for path in sorted(ROOT.rglob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 80]
    assert not too_long, "split these by responsibility: " + ", ".join(too_long)
