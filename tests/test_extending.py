"""A method is one file: a plugin outside ``interp/`` (the documentation's example, ``docs/examples/
tangent_method.py``), loaded with ``--plugin``, shows in ``--help``, ``--plan``, the tables, figures and report of a
comparison and the erasure curves, with its own option, and no other file names it."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "docs" / "examples" / "tangent_method.py"

pytestmark = pytest.mark.xdist_group("compare")


@pytest.fixture
def plugin():
    """The example plugin's path; its registration is undone afterwards, so no other test sees it."""
    from interp.methods import REGISTRY

    yield str(PLUGIN)
    REGISTRY.pop("tangent", None)
    for name in [m for m in sys.modules if m.startswith("interp_plugin_tangent_method")]:
        del sys.modules[name]


def _args(world, *extra):
    return ["--plugin", str(PLUGIN), "--model", str(world), "--concepts", "red", "--images", "1", "--timesteps",
            "300", "--blocks", "mid_block", "--methods", "ablation", "cad", "coar", "tangent", "--tangent-at", "0.9",
            "--coar-masks", "20", "--lds-alphas", "0.2", "--heldout-masks", "10", "--n-boot", "100", "--no-progress",
            "--threads", "1", *extra]


def test_its_options_are_in_help_and_refused_when_bad(plugin, capsys, refused):
    from analyses import compare_methods, erasure_curves

    for command in (compare_methods, erasure_curves):
        with pytest.raises(SystemExit) as e:
            command.main(["--plugin", plugin, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "options of the tangent gradient (tangent)" in text and "--tangent-at" in text, command
    # its own check of its option, named by its flag, before anything loads
    msg = refused(compare_methods.main, ["--plugin", plugin, "--methods", "ablation", "tangent", "--tangent-at", "2"])
    assert "--tangent-at 2" in msg and "at must be in [0, 1]" in msg
    assert "no/such.py does not exist" in refused(compare_methods.main, ["--plugin", "no/such.py", "--help"])


def test_without_the_plugin_its_name_and_flag_are_unknown(capsys):
    from analyses.compare_methods import main

    with pytest.raises(SystemExit) as e:
        main(["--methods", "ablation", "tangent"])
    assert e.value.code == 2 and "unknown method(s) ['tangent']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--tangent-at", "0.5"])
    assert "unrecognized arguments: --tangent-at" in capsys.readouterr().err


@pytest.mark.slow  # ~30 s: a comparison with erasure curves, then the erasure command
def test_it_runs_in_the_plan_tables_figures_report_and_erasure_curves(tiny_world_folder, plugin, tmp_path, capsys):
    from analyses import compare_methods, erasure_curves

    assert compare_methods.main(_args(tiny_world_folder, "--plan")) == 0
    plan = capsys.readouterr().out
    assert any(line.split()[:1] == ["tangent"] for line in plan.splitlines()), plan

    out = tmp_path / "run"
    erasure = ["--erasure-k", "1", "--erasure-images", "6", "--erasure-steps", "2"]
    assert compare_methods.main(_args(tiny_world_folder, "--out", str(out), *erasure)) == 0
    df = pd.read_parquet(out / "results.parquet")
    assert "tangent" in set(df["method"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["options"]["tangent"] == {"at": 0.9}
    assert meta["methods"]["tangent/red"]["config"]["method_config"]["at"] == 0.9  # the option reached the method
    tables = {p.stem: pd.read_csv(p) for p in (out / "tables").glob("*.csv")}
    for name in ("correlations", "correlations_by_layer", "topk", "lds", "lds_vs_coar", "cost", "accuracy_vs_cost",
                 "erasure_curves", "erasure_auc"):
        assert "tangent" in set(tables[name]["method"]), name
    assert (out / "figures" / "localization-tangent.png").stat().st_size > 1000
    html = (out / "index.html").read_text()
    assert "<td>tangent</td>" in html.split("<details")[0]

    # the erasure curves command, on the comparison's results and with its own ranking
    curves = tmp_path / "curves"
    assert erasure_curves.main(["--plugin", plugin, "--compare", str(out), "--methods", "tangent", "--concepts", "red",
                                "--k", "1", "--images", "6", "--steps", "2", "--random-rankings", "1",
                                "--random-masks", "0", "--n-boot", "100", "--no-progress", "--out", str(curves)]) == 0
    assert "tangent" in set(pd.read_csv(curves / "tables" / "curves.csv")["method"])


#: Method names that may appear as string literals outside interp/methods/, and why.
ALLOWED = {
    ("interp/studies/editing/edits.py", "cad"): "CAD-Erase, CAD-Amplify and COAR-Edit are defined on CAD's scores "
                                                "(their "
                                        "papers'); the method is a parameter",
    ("interp/core/engine.py", "ablation"): "a progress bar's text",
    ("interp/testing.py", "midpoint"): "a DPM-Solver option, not the method",
}


def test_no_method_name_is_written_outside_its_file():
    """The comparison, plan, tables, figures and report find the reference, the LDS baseline, labels and options
    through the registry: a method's name as a string literal anywhere else in interp/ is a place a new method would
    have to be added by hand."""
    from interp.methods import REGISTRY

    found = []
    for path in sorted((ROOT / "interp").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("interp/methods/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in REGISTRY and (rel, node.value) not in ALLOWED:
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not found, found
