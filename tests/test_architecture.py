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
        assert not bad, f"{path.name} imports {sorted(bad)}: shared work belongs in interp.engine"


def test_the_engine_imports_no_method():
    bad = {m for m in imports_of(ROOT / "engine.py") if m.startswith("interp.methods")}
    assert not bad


CORE = ("models", "components", "concepts", "objectives", "interventions", "diffusion", "generation", "engine")


def test_the_core_does_not_import_the_concept_world():
    """The world registers itself (interp.world.plugin, an ``interp.plugins`` entry point); the core only sees it
    through ``model.world``."""
    files = [ROOT / f"{m}.py" for m in CORE] + sorted((ROOT / "methods").glob("*.py"))
    for path in files:
        bad = {m for m in imports_of(path) if m == "interp.world" or m.startswith("interp.world.")}
        assert not bad, f"{path.relative_to(ROOT.parent)} imports {sorted(bad)}"


def test_the_world_is_registered_as_a_plugin():
    from importlib.metadata import entry_points

    import interp

    assert "concept-world" in {ep.name for ep in entry_points(group="interp.plugins")}
    assert "concept-world" in interp.models.shipped_models()


#: Every module of the core, the methods and the studies: importing any of them loads no concept-world module.
LOADED_WITHOUT_THE_WORLD = (
    "interp.models", "interp.components", "interp.families", "interp.concepts", "interp.objectives",
    "interp.judges", "interp.interventions", "interp.diffusion", "interp.generation", "interp.engine",
    "interp.prefix", "interp.methods", "interp.compare", "interp.compare_config", "interp.plan", "interp.erasure",
    "interp.editing", "interp.editing.evaluate", "interp.editing.uce", "interp.evaluation", "interp.report",
    "interp.plots", "interp.runs", "interp.store", "interp.executors",
)


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
