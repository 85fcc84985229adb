"""The house rules that keep the code base navigable, checked on the import graph (no import is executed)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "interp"


def imports_of(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_no_method_imports_another_method():
    methods = {p.stem for p in (ROOT / "methods").glob("*.py")} - {"__init__", "base"}
    for path in (ROOT / "methods").glob("*.py"):
        if path.stem in ("__init__", "base"):
            continue
        others = {f"interp.methods.{m}" for m in methods - {path.stem}}
        bad = imports_of(path) & others
        assert not bad, f"{path.name} imports {sorted(bad)}: shared work belongs in interp.core.engine"


def test_the_engine_imports_no_method():
    bad = {m for m in imports_of(ROOT / "core" / "engine.py") if m.startswith("interp.methods")}
    assert not bad


def test_the_core_does_not_import_the_concept_world():
    """The world registers itself (interp.world.plugin, an ``interp.plugins`` entry point); the core only sees it
    through ``model.world``."""
    files = [p for floor in ("core", "methods", "report", "studies") for p in sorted((ROOT / floor).rglob("*.py"))]
    assert len(files) > 40
    for path in files:
        bad = {m for m in imports_of(path) if m == "interp.world" or m.startswith("interp.world.")}
        assert not bad, f"{path.relative_to(ROOT.parent)} imports {sorted(bad)}"


def test_the_world_is_registered_as_a_plugin():
    from importlib.metadata import entry_points

    import interp

    assert "concept-world" in {ep.name for ep in entry_points(group="interp.plugins")}
    assert "concept-world" in interp.core.models.shipped_models()


#: Every module of the core, the methods, the report and the studies: importing any of them loads no concept-world
#: module.
LOADED_WITHOUT_THE_WORLD = tuple(
    ".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
    for floor in ("core", "methods", "report", "studies") for p in sorted((ROOT / floor).rglob("*.py")))


def test_importing_the_core_loads_no_world_module():
    """Checked on ``sys.modules`` in a fresh interpreter, so an indirect import (a core module importing one that
    imports the world) fails too; the world is reached at run time through ``model.world`` and the plugin."""
    import json
    import subprocess
    import sys

    code = ("import importlib, json, sys\n"
            f"for m in {list(LOADED_WITHOUT_THE_WORLD)!r}:\n"
            "    importlib.import_module(m)\n"
            "print(json.dumps(sorted(k for k in sys.modules if k == 'interp.world' or k.startswith('interp.world.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def _import_graph() -> dict[str, set[str]]:
    """Every import between ``interp`` modules, at module level or inside a function (``from .x import y`` and
    ``from . import x`` both count)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    mods = {}
    for p in (root / "interp").rglob("*.py"):
        name = ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = p
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                found = [f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {t for t in found if t in mods and t != m and not m.startswith(t + ".")}
    return graph


def test_no_import_circle_among_interp_modules():
    """No module of interp imports, directly or through others, a module that imports it: the layers read one way
    (a package's ``__init__`` importing its own modules aside)."""
    graph = _import_graph()
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, circles


#: The floors, bottom to top: each imports only the floors below it (and itself).
FLOORS = ("core", "methods", "report", "studies", "world")


def test_each_floor_imports_only_the_floors_below():
    """core < methods < report < studies < world: the folders show the layers, and data flows one way."""
    graph = _import_graph()

    def floor(module: str) -> int | None:
        parts = module.split(".")
        return FLOORS.index(parts[1]) if len(parts) > 1 and parts[1] in FLOORS else None

    assert {floor(m) for m in graph} >= set(range(len(FLOORS)))
    bad = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                 if floor(m) is not None and floor(t) is not None and floor(t) > floor(m))
    assert not bad, bad
