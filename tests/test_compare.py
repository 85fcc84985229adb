"""The main job end to end on a tiny concept-world checkpoint: outputs and schemas, the report in a browser, cache
reuse, and a run killed midway that resumes to the same tables."""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import assert_same_tables, killed_compare_run
from helpers import compare_args as args_for

from interp.core.results import COLUMNS, Cost

ROOT = Path(__file__).resolve().parents[1]

# One xdist worker runs this module (`--dist loadgroup`): the module's run folder (~20 s) is made once, not per worker.
pytestmark = pytest.mark.xdist_group("compare")


@pytest.fixture(scope="module")
def tiny_world(tiny_world_folder) -> Path:
    return tiny_world_folder


@pytest.fixture(scope="session")
def run_dir(tiny_world_folder, tmp_path_factory) -> Path:
    """The module's comparison run, made once per worker: session-scoped, because xdist may tear a module's fixtures
    down between two of its tests (it did: the run was made twice on one worker)."""
    from analyses.compare_methods import main

    out = tmp_path_factory.mktemp("cmp") / "run"
    assert main(args_for(tiny_world_folder, out)) == 0
    return out


def test_outputs_and_schemas(run_dir):
    for f in ("index.html", "results.parquet", "meta.json", "status.json"):
        assert (run_dir / f).exists(), f
    df = pd.read_parquet(run_dir / "results.parquet")
    assert list(df.columns) == COLUMNS
    assert {"ablation", "cad", "coar", "maskgrad", "ig", "midpoint", "screen", "tracing"} <= set(df["method"])
    assert set(df["concept"]) == {"red", "circle"}
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["config"]["concepts"] == ["red", "circle"]
    assert {"torch", "diffusers", "nnsight"} <= set(meta["versions"])
    for key, m in meta["methods"].items():
        assert m["cost"]["seconds"] >= 0 and m["cost"]["forward_evals"] >= 0, key
    assert json.loads((run_dir / "status.json").read_text())["status"] == "complete"
    tables = {p.stem: pd.read_csv(p) for p in (run_dir / "tables").glob("*.csv")}
    assert set(tables) == {"correlations", "correlations_by_layer", "topk", "lds", "lds_vs_coar", "cost",
                           "wall_time", "accuracy_vs_cost", "corruption"}
    # causal tracing's corruption check, one row per concept and noise draw, from the run's own metadata
    cor = tables["corruption"]
    assert set(cor["method"]) == {"tracing"} and set(cor["concept"]) == {"red", "circle"}
    for concept, g in cor.groupby("concept"):
        m = meta["methods"][f"tracing/{concept}"]
        assert g["j_corrupted"].tolist() == pytest.approx(m["j_corrupted"])
        assert g["removed"].tolist() == pytest.approx(m["corruption_removed"])
        assert (g["valid"] == m["corruption_valid"]).all()
        assert m["corruption_valid"] == all(r >= 0.02 for r in m["corruption_removed"])
    assert "Does the corruption remove the concept?" in (run_dir / "index.html").read_text()
    assert "seconds" not in tables["cost"] and (tables["wall_time"]["seconds"] >= 0).all()
    vs = tables["lds_vs_coar"]
    assert set(vs["baseline"]) == {"coar"} and "coar" not in set(vs["variant"]) and "maskgrad@0.2" in set(vs["variant"])
    assert (vs["difference_lo"] <= vs["difference_hi"]).all()
    assert np.allclose(vs["difference"], vs["lds_spearman"] - vs["baseline_lds_spearman"])
    assert len(vs) == len(tables["lds"][tables["lds"]["variant"] != "coar"])
    corr = tables["correlations"]
    for col in ("pearson", "pearson_lo", "pearson_hi", "spearman", "kendall"):
        assert col in corr
    assert set(corr["method"]) >= {"cad", "coar", "maskgrad", "tracing"}
    assert set(tables["lds"]["alpha"]) == {0.01, 0.05, 0.2}
    assert set(tables["topk"]["fraction"]) == {0.01, 0.05, 0.1}
    assert (tables["cost"]["forward_equivalents"] > 0).all()
    acc = tables["accuracy_vs_cost"]
    # Variants are typed columns: method is the registered method; budget variants form one estimator's curve: COAR
    # at several mask counts, the mask-averaged gradient at K = 2, 4.
    assert set(acc["method"]) <= set(df["method"]) and not any("@" in m for m in acc["method"])
    est = acc.drop_duplicates("variant").set_index("variant")
    assert est.loc["maskgrad@0.05-K2", "estimator"] == est.loc["maskgrad", "estimator"] == "maskgrad"
    assert est.loc["maskgrad@0.2-K2", "estimator"] == "maskgrad@0.2"
    assert est.loc["maskgrad@0.2-K2", ["method", "budget", "mask_alpha"]].tolist() == ["maskgrad", 2, 0.2]
    coar = est[est["method"] == "coar"]
    assert len(coar) > 1 and (coar["estimator"] == "coar").all() and coar["budget"].is_unique
    k2 = acc[(acc["variant"] == "maskgrad@0.2-K2")]["forward_evals"]
    assert (k2 == 2 + 2 * 2).all()  # 2 forward + 2 backward passes (a backward counts as two forwards)
    figures = {p.stem for p in (run_dir / "figures").glob("*.png")}
    assert {"accuracy-vs-cost", "scatter-red", "maps-tracing-unet-red", "maps-tracing-text-circle", "localization-cad"} <= figures
    html = (run_dir / "index.html").read_text()
    assert "agrees best with true ablation" in html and "http://" not in html and "https://" not in html
    assert "screen-then-verify agrees best" not in html  # its top scores are the reference's own (summary_sentences)


def test_report_in_browser(run_dir, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from browser import open_page, require_chromium

    require_chromium()  # skips locally without a browser, fails under CI=true
    page = open_page(run_dir / "index.html", screenshot_to=tmp_path / "report.png")
    assert page["images"] and all(i["complete"] and i["natural_width"] > 0 for i in page["images"])
    assert page["tables"] and all(n > 0 for n in page["tables"])
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_rerun_reuses_cache(run_dir, tiny_world):
    from analyses.compare_methods import main

    before = pd.read_parquet(run_dir / "results.parquet")
    t0, wall0 = time.perf_counter(), time.time()
    assert main(args_for(tiny_world, run_dir)) == 0
    meta = json.loads((run_dir / "meta.json").read_text())
    # Cached methods report their original cost; nothing was recomputed, so this run's method time is tiny.
    assert sum(meta["seconds_this_run"].values()) < 5.0, meta["seconds_this_run"]
    pd.testing.assert_frame_equal(before, pd.read_parquet(run_dir / "results.parquet"))
    # Tables and figures came from the derived-output cache too: no entry written by this run.
    derived = list((run_dir / "cache").glob("derived-*/meta.json"))
    assert derived and all(d.stat().st_mtime < wall0 for d in derived), derived
    assert time.perf_counter() - t0 < 120


#: Run in a fresh interpreter on an edited copy of the package: the digest of the edited source, the run, then the
#: digest with the edit undone and with an edit of a module that makes no table or figure.
EDITED_RUN = r"""
import json, pathlib, sys, types
from interp.studies import compare
from interp.report import plots
from interp.core import store
from analyses.compare_methods import main

sys.path.insert(0, sys.argv[3])  # the tests' helpers: no test looks at this run's figures (their code's digest is
from helpers import placeholder_figures  # what matters), so they are placeholders
placeholder_figures(types.SimpleNamespace(setattr=setattr))
edited = compare.derived_code_digest()
code = main(json.loads(sys.argv[1]))
p = pathlib.Path(plots.__file__)
p.write_text(p.read_text().replace(sys.argv[2], ""))
undone = compare.derived_code_digest()
q = pathlib.Path(store.__file__)
q.write_text(q.read_text() + "\n# an edit outside the table and figure code\n")
print(json.dumps({"edited": edited, "code": code, "undone": undone, "unrelated": compare.derived_code_digest(),
                  "plots": plots.__file__}))
"""


@pytest.mark.slow  # a fresh interpreter on a copy of the package, rerunning the comparison (~10-15 s)
def test_changed_table_code_remakes_tables_not_methods(run_dir, tiny_world, tmp_path):
    """Cached tables and figures are keyed by the source of the code that makes them: a copy of the package whose
    figure code is edited remakes them (one new derived entry, the same tables) while every method result still comes
    from the cache; undoing the edit gives back the digest, and an edit elsewhere leaves it."""
    import os
    import shutil
    import subprocess

    from interp.studies import compare

    digest = compare.derived_code_digest()
    assert digest == compare.derived_code_digest() and len(digest) == 16
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "assets", "*.egg-info")
    for pkg in ("interp", "analyses"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=skip)
    (src / "interp" / "world" / "assets").symlink_to(ROOT / "interp" / "world" / "assets")
    added = "\n\ndef _an_edited_helper():\n    return None\n"
    plots_py = src / "interp" / "report" / "plots.py"
    plots_py.write_text(plots_py.read_text() + added)
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)  # the shared run folder stays as it was
    before = set((run / "cache").glob("derived-*/meta.json"))
    out = subprocess.run([sys.executable, "-c", EDITED_RUN, json.dumps(args_for(tiny_world, run)), added,
                          str(Path(__file__).parent)],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(got["plots"]).resolve() == plots_py.resolve()  # the copy ran, not the installed package
    assert got["code"] == 0
    assert got["edited"] != digest  # edited figure code: another digest
    assert got["undone"] == digest and got["unrelated"] == digest
    meta = json.loads((run / "meta.json").read_text())
    assert sum(meta["seconds_this_run"].values()) < 5.0, meta["seconds_this_run"]  # no method ran again
    assert len(set((run / "cache").glob("derived-*/meta.json")) - before) == 1  # tables and figures remade
    assert_same_tables(run_dir, run)


def test_bad_arguments_exit_nonzero(tiny_world, tmp_path, refused):
    from analyses.compare_methods import main

    assert "magenta" in refused(main, ["--model", str(tiny_world), "--concepts", "magenta", "--out", str(tmp_path / "x")])
    assert "needs 'ablation'" in refused(main, ["--methods", "cad", "--out", str(tmp_path / "y")])
    assert "missing" in refused(main, ["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "z")])


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_tables(tiny_world, run_dir, tmp_path):
    """Kill a run once some work is cached; the resumed run's tables equal the uninterrupted run's."""
    from analyses.compare_methods import main

    out = tmp_path / "killed"
    code = killed_compare_run(args_for(tiny_world, out), out, ROOT)
    assert code != 0, "the run finished before it could be killed: make the configuration bigger"
    assert not (out / "index.html").exists() and not (out / "results.parquet").exists()
    assert json.loads((out / "status.json").read_text())["status"] == "running"
    assert main(args_for(tiny_world, out)) == 0
    assert_same_tables(run_dir, out)  # the cost too: passes of work done before the kill count
    assert json.loads((out / "status.json").read_text())["status"] == "complete"


@pytest.mark.slow  # several seconds: a comparison with erasure curves (the plugin test also measures them)
def test_erasure_curves_are_a_section_of_the_comparison(tiny_world, tmp_path, capsys, refused):
    """--erasure-k adds the erasure curves (interp.studies.erasure) of every method's ranking to the run: tables,
    figure, report section and findings; a k beyond the component set is refused before any method runs."""
    from analyses.compare_methods import main

    small = ["--methods", "ablation", "cad", "--erasure-images", "12", "--erasure-steps", "2"]
    assert "100000" in refused(main, args_for(tiny_world, tmp_path / "bad", *small, "--erasure-k", "100000"))
    assert not list((tmp_path / "bad").glob("cache/*/result.parquet"))
    out = tmp_path / "run"
    assert main(args_for(tiny_world, out, *small, "--erasure-k", "1", "4")) == 0
    curves = pd.read_csv(out / "tables" / "erasure_curves.csv")
    assert {"ablation", "cad"} <= set(curves["method"]) and len(set(curves["method"])) == 3  # and the random orders
    assert set(curves["concept"]) == {"red", "circle"} and {1, 4} <= set(curves["k"])
    for name in ("erasure_auc", "erasure_prediction", "erasure_points", "erasure_per_value"):
        assert len(pd.read_csv(out / "tables" / f"{name}.csv")), name
    assert (out / "figures" / "erasure-curves.png").stat().st_size > 1000
    html = (out / "index.html").read_text()
    assert "Erasure curves" in html and "End-to-end prediction" in html


# -- a method the comparison has never heard of ------------------------------------------------------------------------
@pytest.fixture
def toy_method():
    """A method registered the way a user's own module would: a seeded random guess (no model passes) with one
    budget variant, and a map of its UNet components along the timestep axis. It is unregistered afterwards, so no
    other test sees it."""
    from interp.methods import REGISTRY, Capabilities, Estimate, Map, Method, MethodConfig, Scores, register

    @dataclass(frozen=True)
    class ToyConfig(MethodConfig):
        spread: float = 1.0

    @register
    class Toy(Method):
        name = "toy"
        Config = ToyConfig
        capabilities = Capabilities(maps=True)

        def _scores(self, obj, comps, run):
            guesses = np.random.default_rng(self.config.seed).normal(0, self.config.spread, (2, len(comps)))
            return Scores(guesses.mean(0), columns={"budget": 2},
                          maps=[Map(comps, guesses[i], np.zeros(len(comps)), "timestep", t)
                                for i, t in enumerate((700, 300))],
                          variants=[Estimate(guesses[0], columns={"variant": "toy@1", "estimator": "toy", "budget": 1})],
                          cost=Cost(2.0), variant_costs={"toy@1": Cost(1.0)})

    yield Toy
    REGISTRY.pop("toy")


def test_a_registered_method_appears_in_tables_figures_and_report(tiny_world, toy_method, tmp_path):
    """Adding a method is one registration: its options come from its own declaration (the seed here), and it and
    its variant reach every table, the figures and the report without an edit to the comparison."""
    from analyses.compare_methods import main
    from interp.studies.compare_config import CompareConfig

    cfg = CompareConfig(methods=("ablation", "toy"), seed=3)
    assert cfg.method_options("toy", 16) == {"seed": 3}
    from interp.methods import get

    assert get("screen")(**cfg.method_options("screen", 16)).config.fraction == 0.1  # its declared default
    given = CompareConfig(methods=("ablation", "screen"), options={"screen": {"fraction": 0.3}})
    assert given.method_options("screen", 16)["fraction"] == 0.3
    out = tmp_path / "run"
    assert main(["--model", str(tiny_world), "--concepts", "red", "--images", "1", "--timesteps", "300",
                 "--blocks", "mid_block", "--methods", "ablation", "cad", "toy", "--lds-alphas", "0.2",
                 "--heldout-masks", "10", "--n-boot", "100", "--out", str(out), "--no-progress",
                 "--threads", "1"]) == 0
    df = pd.read_parquet(out / "results.parquet")
    toy = df[df["method"] == "toy"].drop_duplicates("variant").set_index("variant")
    assert toy["budget"].to_dict() == {"toy": 2, "toy@1": 1} and set(toy["estimator"]) == {"toy"}
    tables = {p.stem: pd.read_csv(p) for p in (out / "tables").glob("*.csv")}
    for name in ("correlations", "correlations_by_layer", "topk", "lds", "cost", "accuracy_vs_cost"):
        assert {"toy", "toy@1"} <= set(tables[name]["variant"]), name
        assert set(tables[name].loc[tables[name]["variant"] == "toy@1", "method"]) == {"toy"}, name
    cost = tables["cost"].set_index("variant")["forward_equivalents"]
    assert (cost["toy"], cost["toy@1"]) == (2.0, 1.0)
    assert "toy" in set(tables["wall_time"]["method"])
    figures = {p.stem for p in (out / "figures").glob("*.png")}
    assert {"localization-toy", "scatter-red", "scatter-variants-red", "accuracy-vs-cost", "maps-toy-unet",
            "maps-toy-unet-red"} <= figures
    maps = pd.read_parquet(out / "maps.parquet")
    assert set(maps["method"]) == {"toy"} and set(maps["position"]) == {300, 700}
    html = (out / "index.html").read_text()
    main_tables = html.split("<details")[0]  # the main tables, before the collapsed evidence
    assert re.search(r"<td>toy</td>", main_tables) and "<td>toy@1</td>" in html and "Maps: toy" in html


def test_models_side_by_side_reads_runs_and_checks_every_finding(run_dir, tmp_path, capsys):
    from analyses.models_side_by_side import main

    out = tmp_path / "side.md"
    assert main([f"one={run_dir}", f"two={run_dir}", "--out", str(out)]) == 0
    text = out.read_text()
    for section in ("Spearman with true ablation", "LDS per held-out ablation rate", "against COAR",
                    "Where each concept lives", "Early against late", "corruption remove each concept",
                    "Findings, each checked"):
        assert section in text
    depth = text.split("Early against late")[1].split("##")[0].split("\n", 1)[1]  # the table, not its title
    assert "early " in depth and "context stream" not in depth  # a UNet has one stream
    findings = text.split("Findings, each checked")[1]
    rows = [r for r in findings.splitlines() if r.startswith("| ") and "finding" not in r]
    assert len(rows) == 5
    for r in rows:  # each finding decided on both runs, identically (the same run twice)
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert cells[1] == cells[2] and cells[1].startswith(("holds", "does not hold")), r
    assert main(["no-equals-sign"]) == 2
    assert main([f"x={tmp_path}"]) == 2
    assert "not a finished compare_methods run" in capsys.readouterr().err


def _library_bars():
    import diffusers
    import transformers

    return diffusers.utils.logging.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled()


def test_no_progress_hides_the_libraries_loading_bars_too(tiny_world, tmp_path, capfd, no_figures):
    """``--no-progress`` means no bar at all: diffusers' and transformers' loading bars, which a plain run shows
    when it loads the model, are switched off with the suite's own, and back on after the call (the libraries'
    switch is process-wide: a notebook calling ``main`` keeps its bars)."""
    from analyses.compare_methods import main
    from interp.core.runtime import library_progress_bars

    args = ["--model", str(tiny_world), "--concepts", "red", "--images", "1", "--timesteps", "300", "--blocks",
            "mid_block", "--methods", "ablation", "--lds-alphas", "0.2", "--heldout-masks", "10", "--n-boot", "100",
            "--threads", "1"]
    with library_progress_bars(True):  # whatever state this process is in, and restored after
        assert main([*args, "--out", str(tmp_path / "bars")]) == 0
        err = capfd.readouterr().err
        assert "Loading pipeline components" in err and "it/s]" in err  # the bars a plain run shows
        assert main([*args, "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
        err = capfd.readouterr().err
        assert "Loading" not in err and "it/s]" not in err and "%|" not in err, err
        assert (tmp_path / "quiet" / "index.html").exists()
        assert _library_bars() == (True, True)  # restored when main returns


@pytest.mark.parametrize("command", ["edit_concepts", "erasure_curves", "text_restoration"])
def test_every_command_that_loads_a_model_takes_no_progress(command, tiny_world, tmp_path, capfd, no_figures):
    """The other commands that load a model take ``--no-progress`` too: no loading bar, and the libraries' bars as
    they were after ``main`` returns, also when it fails."""
    import importlib

    from interp.core.runtime import library_progress_bars

    main = importlib.import_module(f"analyses.{command}").main
    common = ["--model", str(tiny_world), "--concepts", "red", "--threads", "1", "--no-progress"]
    args = {"edit_concepts": ["--edits", "diff-quickfix", "--images", "3", "--steps", "1", "--attr-images", "1",
                              "--out", str(tmp_path / "run")],
            "erasure_curves": ["--methods", "cad", "--blocks", "mid_block", "--k", "1", "--images", "3", "--steps",
                               "1", "--random-rankings", "1", "--random-masks", "1", "--n-boot", "100",
                               "--attr-images", "1", "--timesteps", "300", "--out", str(tmp_path / "run")],
            "text_restoration": ["--images", "1", "--steps", "1", "--noise", "1",
                                 "--out", str(tmp_path / "restoration.csv")]}[command]
    with library_progress_bars(True):
        assert main([*common, *args]) == 0
        err = capfd.readouterr().err
        assert "Loading" not in err and "it/s]" not in err and "%|" not in err, err
        assert _library_bars() == (True, True)
        # a failure (a model folder that is not one) restores the bars too
        with pytest.raises(SystemExit) as e:
            main(["--model", str(tmp_path / "no-such-model"), *common[2:], *args])
        err = capfd.readouterr().err
        assert e.value.code == 2 and "error: model folder" in err and "no-such-model' does not exist" in err, err
        assert _library_bars() == (True, True)


def test_library_progress_bars_restores_the_state_it_found():
    from interp.core.runtime import library_progress_bars

    for start in (True, False):
        with library_progress_bars(start):
            with pytest.raises(RuntimeError, match="inside"):
                with library_progress_bars(not start):
                    assert _library_bars() == (not start, not start)
                    raise RuntimeError("inside")
            assert _library_bars() == (start, start)

def test_text_restoration_takes_device_precision_guidance_and_max_batch(tiny_world, tmp_path, monkeypatch, refused,
                                                                        no_figures):
    """text_restoration runs where and how the other commands do: --device, --precision, --guidance, and every UNet
    pass within --max-batch rows (with guidance, two rows per image)."""
    import torch
    from diffusers import UNet2DConditionModel

    from analyses.text_restoration import main

    seen, forward = [], UNet2DConditionModel.forward

    def counted(self, sample, *args, **kwargs):
        seen.append((sample.shape[0], sample.dtype))
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counted)
    common = ["--model", str(tiny_world), "--concepts", "red", "--images", "3", "--steps", "1", "--noise", "1",
              "--threads", "1", "--no-progress", "--out", str(tmp_path / "r.csv")]
    assert main([*common, "--device", "cpu", "--precision", "float64", "--guidance", "2", "--max-batch", "2"]) == 0
    # (one row: the pass that finds the modules' execution order when the model loads)
    assert seen and max(rows for rows, _ in seen) == 2 and {dt for _, dt in seen} == {torch.float64}, seen
    for bad in (["--max-batch", "0"], ["--guidance", "-1"]):
        assert "--" in refused(main, [*common, *bad])
