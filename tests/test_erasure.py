"""Erasure curves (interp.studies.erasure, analyses.erasure_curves): a known answer on a planted model where one unit
alone carries the concept, the retained rate as the edit evaluation defines it, and the command line (outputs, bad
inputs
refused in one line before any work)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import assert_weights_equal
from test_methods import LINEAR_CFG, MID, LinearFF, _planted_model

import interp
from interp.core.judges import Judge
from interp.methods import REGISTRY
from interp.studies import editing as ed
from interp.studies import erasure as er

# One worker runs the module: its module fixtures (the planted model and its held-out images) are built once.
pytestmark = pytest.mark.xdist_group("erasure")


class PlantedJudge(Judge):
    """Names the color "red" exactly when an image is one the planted model draws intact (within ``atol``): on the
    planted model the concept *is* the planted unit's contribution to the image. Every other attribute gets its first
    value, so the retained rate is defined and stays 1."""

    name = "planted"

    def __init__(self, reference: torch.Tensor, atol: float = 1e-5):
        self.reference, self.atol = reference.reshape(len(reference), -1), atol

    def _intact(self, images):
        d = (images.reshape(len(images), 1, -1) - self.reference[None]).abs().amax(-1)
        return d.min(1).values <= self.atol

    def predict(self, images, attribute_values):
        out = {}
        for a, values in attribute_values.items():
            p = torch.zeros(len(images), len(values))
            if a == "color":
                intact = self._intact(images)
                p[intact, list(values).index("red")] = 1.0
                p[~intact, list(values).index("green")] = 1.0
            else:
                p[:, 0] = 1.0
            out[a] = p
        return out

    def probability(self, images, concept):
        return self._intact(images).float()

    def features(self, images):
        return images.reshape(len(images), 3, -1).mean(-1).double().numpy()

    def to(self, device):
        return self


@pytest.fixture(scope="module")
def planted(tiny_world_model_factory_module):
    """The planted model (one GEGLU unit of the mid block is the only one with any effect downstream), its
    objective (linear in that block's units: the methods' known answer), the component set and the planted judge."""
    m, star, v = _planted_model(tiny_world_model_factory_module)
    w = m.module(f"{MID}.ff.net.2").weight
    with torch.no_grad():  # no other unit of the block reaches anything: ablating one changes no image at all
        keep = w[:, star].clone()
        w.zero_()
        w[:, star] = keep * 20
    obj = LinearFF(m, "red", replace(LINEAR_CFG, dtype="float32"), MID, v)  # exact zeros need no float64
    comps = m.components("neuron", kind="ff.net.0", layer="mid.a0.tb0")
    cfg = ed.EvalConfig(n_target=4, n_alone=2, n_other=4, steps=2)
    held = ed.heldout_set(m, "red", cfg)
    intact = ed.judge_images(m, None, held, cfg, PlantedJudge(torch.zeros(1, 3, 16, 16))).images
    judge = PlantedJudge(intact)
    return m, star, obj, comps, cfg, judge


@pytest.fixture(scope="module")
def tiny_world_model_factory_module():
    from conftest import _build_tiny_world_model

    return _build_tiny_world_model


OPTIONS = {"coar": {"n_masks": 100, "alpha": 0.2}, "tracing": {"maps": False, "n_noise": 1}, "ig": {"steps": 4},
           "maskgrad": {"n_masks": 4}, "screen": {"fraction": 0.25, "screen_options": (("n_masks", 4),)}}


@pytest.mark.filterwarnings("ignore:causal tracing")  # the planted objective barely moves under tracing's noise
def test_planted_unit_every_method_erases_at_k1_and_random_orders_do_not(planted):
    m, star, obj, comps, cfg, judge = planted
    before = m.state_fingerprint()
    rankings = {}
    for method in sorted(REGISTRY):
        df = interp.attribute(method, m, obj.concept, comps, objective=obj, **OPTIONS.get(method, {}))
        rankings[method] = ed.Ranking.from_frame(df[df["variant"] == df["method"]] if "variant" in df else df)
        assert rankings[method].components[0] == comps.addresses[star], method
    base = ed.baseline(m, "red", cfg, judge)
    config = er.ErasureConfig(ks=(1, 2, 8, 32), n_random=3, n_masks=8, mask_rates=(0.2, 0.5), n_boot=200)
    e = er.measure(m, "red", comps, rankings, base, obj, config)
    assert_weights_equal(m, before)
    curves, auc, res = er.curve_tables([e], config.n_boot)
    rate = curves[curves["metric"] == "concept_rate"].pivot_table(index="method", columns="k", values="value")
    assert (rate[0] == 1.0).all()  # the intact model draws the concept on every target image
    for method in rankings:  # the planted unit is ranked first: the concept is gone at k = 1 and stays gone
        assert (rate.loc[method, [1, 2, 8, 32]] == 0.0).all(), method
    assert rate.loc[er.RANDOM, 1] == 1.0  # no random order starts with the planted unit (1 in 64)
    assert rate.loc[er.RANDOM, 32] < 1.0  # ... and half of the set hits it in some order
    pts = er.point_table([e], res)
    first = pts[(pts["kind"] == "topk") & (pts["method"] == er.RANDOM) & (pts["k"] == 1)]
    assert (first["concept_rate"] == 1.0).all() and len(first) == 3
    a = auc[auc["metric"] == "concept_rate"].set_index("method")["auc"]
    assert (a.drop(er.RANDOM) < a[er.RANDOM]).all()
    # J on the objective: ablating the planted unit leaves only the bias LinearFF reads, whatever else goes
    j = curves[curves["metric"] == "j_ratio"].pivot_table(index="method", columns="k", values="value")
    floor = j.loc["cad", 32]
    assert floor < 0.01
    np.testing.assert_allclose(j.drop(er.RANDOM)[[1, 2, 8, 32]].to_numpy(), floor, rtol=1e-9)
    # float32: the ablated rows run at other batch sizes than the intact pass (prefix replay groups rows by where
    # their ablation starts), so "unchanged" is equal up to rounding
    assert j.loc[er.RANDOM, 1] == pytest.approx(1.0, abs=1e-6)
    # each method's sum of scores predicts the measured drop: only sets with the planted unit lose the concept
    masks = pts[pts["kind"] == "mask"]
    assert 0 < (masks["concept_rate"] == 0).sum() < len(masks)  # both kinds of random mask are present
    pred = er.prediction_table([e], res, config.n_boot)
    got = pred[pred["target"] == "concept_rate"].set_index("method")["spearman"]
    # every set with the planted unit is predicted above every set without it; among the sets without it the
    # measured drops tie at 0 while COAR's least-squares residue and float32 rounding of true ablation order the
    # predictions at random, so the rank correlation is high but need not be 1
    has = e.sets[:, star]
    for method, sc in e.scores.items():
        pred_sum = e.sets.astype(float) @ np.array([sc[a] for a in e.components])
        assert pred_sum[has].min() > pred_sum[~has].max(), method
    assert (got > 0.5).all(), got


def test_retained_rate_is_the_edit_evaluation_s(planted):
    """The bootstrap's sample value of the retained rate equals evaluate_edit's for the same ablation."""
    m, star, obj, comps, cfg, judge = planted
    base = ed.baseline(m, "red", cfg, judge)
    rng = np.random.default_rng(0)
    scores = rng.normal(size=len(comps))
    scores[star] = -1.0  # the planted unit is not ablated, so some images keep the concept and some values change
    ranking = ed.Ranking(tuple(np.array(comps.addresses)[np.argsort(-scores)]), tuple(np.sort(scores)[::-1]),
                         "synthetic", "synthetic")
    config = er.ErasureConfig(ks=(3,), n_random=0, n_masks=0, n_boot=100)
    e = er.measure(m, "red", comps, {"synthetic": ranking}, base, obj, config)
    _, _, res = er.curve_tables([e], config.n_boot)
    pts = er.point_table([e], res)
    ev = ed.evaluate_edit(m, ranking.top(3), "red", cfg, base)
    row = pts[pts["method"] == "synthetic"].iloc[0]
    s = ev.summary.iloc[0]
    assert row["concept_rate"] == pytest.approx(s["target_after"])
    assert row["alone_rate"] == pytest.approx(s["target_alone_after"])
    assert row["retained_rate"] == pytest.approx(s["retained_rate"], nan_ok=True)


def test_k_grid_and_config_checks():
    assert er.k_grid(448) == (1, 2, 4, 8, 16, 32, 64, 128, 224)
    assert er.k_grid(5) == (1, 2)
    assert er.k_grid(64, (16, 1)) == (1, 16)
    with pytest.raises(ValueError, match="exceed"):
        er.k_grid(10, (11,))
    for bad, message in (({"ks": (0,)}, r"ks must be integers >= 1, got \[0\]"),
                         ({"n_boot": 10}, "n_boot must be >= 100 for a 95% interval, got 10"),
                         ({"mask_rates": (1.5,)}, r"mask_rates must be ablation rates in \(0, 1\), got \[1\.5\]"),
                         ({"n_random": -1}, "n_random must be an integer >= 0, got -1")):
        with pytest.raises(ValueError, match=message):
            er.ErasureConfig(**bad)


def cli_args(folder, out, *extra):
    return ["--model", str(folder), "--concepts", "red", "--methods", "cad", "maskgrad", "--blocks", "mid_block",
            "--k", "1", "4", "--images", "6", "--steps", "2", "--random-rankings", "1", "--random-masks", "2",
            "--n-boot", "100", "--attr-images", "1", "--timesteps", "300", "--device", "cpu", "--out", str(out),
            *extra]


def test_cli_writes_every_output(tiny_world_folder, tmp_path, monkeypatch, no_figures):
    """Every output, with every UNet pass (rankings, held-out generations) within --max-batch rows."""
    from helpers import unet_rows

    from analyses.erasure_curves import main

    rows = unet_rows(monkeypatch)
    out = tmp_path / "run"
    assert main([*cli_args(tiny_world_folder, out), "--max-batch", "4"]) == 0
    assert rows and max(rows) <= 4, sorted(set(rows))
    for f in ("index.html", "meta.json", "results.parquet", "tables/curves.csv", "tables/auc.csv",
              "tables/prediction.csv", "tables/points.csv", "tables/per_value.csv", "figures/erasure-curves.png"):
        assert (out / f).exists() and (out / f).stat().st_size > 0, f
    curves = pd.read_parquet(out / "results.parquet")
    assert set(curves["method"]) == {"cad", "maskgrad", er.RANDOM}
    assert set(curves["k"]) == {0, 1, 4} and set(curves["metric"]) == set(er.METRICS)
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    assert json.loads((out / "meta.json").read_text())["model_unchanged"] is True
    assert "End-to-end prediction" in (out / "index.html").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--concepts", "reddish"], "not a concept word"),
    (["--methods", "nonsense"], "unknown method"),
    (["--k", "0"], "--k"),
    (["--mask-rates", "1.5"], "--mask-rates"),
    (["--n-boot", "10"], "--n-boot"),
    (["--images", "2"], "--images"),
    (["--compare", "nowhere"], "not a finished comparison run"),
])
def test_cli_refuses_bad_arguments_before_work(argv, message, tiny_world_folder, tmp_path, refused):
    from analyses.erasure_curves import main

    out = tmp_path / "x"
    assert message in refused(main, [*cli_args(tiny_world_folder, out), *argv])
    assert not out.exists()


def test_cli_refuses_k_beyond_the_component_set(tiny_world_folder, tmp_path, refused):
    from analyses.erasure_curves import main

    out = tmp_path / "x"
    assert "exceed" in refused(main, [*cli_args(tiny_world_folder, out), "--k", "1", "100000"])
    assert not (out / "cache").exists() or not any((out / "cache").iterdir())  # refused before any attribution


def test_cli_reads_rankings_from_a_comparison(tiny_world_folder, tmp_path, refused, no_figures):
    """--compare: the rankings are the comparison's own result rows (no method runs again)."""
    from analyses.compare_methods import main as compare
    from analyses.erasure_curves import main

    cmp_out = tmp_path / "cmp"
    assert compare(["--model", str(tiny_world_folder), "--concepts", "red", "--images", "1", "--timesteps", "300",
                    "--blocks", "mid_block", "--methods", "ablation", "cad", "--heldout-masks", "10",
                    "--lds-alphas", "0.05", "--n-boot", "100", "--device", "cpu", "--no-progress", "--threads", "1",
                    "--out", str(cmp_out)]) == 0
    out = tmp_path / "run"
    assert main([*cli_args(tiny_world_folder, out), "--compare", str(cmp_out), "--methods", "cad", "ablation"]) == 0
    assert not (out / "cache").exists() or not any(p.name.startswith(("cad-", "ablation-"))
                                                   for p in (out / "cache").iterdir())
    pts = pd.read_csv(out / "tables" / "points.csv")
    results = pd.read_parquet(cmp_out / "results.parquet")
    cad = results[(results["method"] == "cad")].sort_values("score", ascending=False)
    top = pts[(pts["method"] == "cad") & (pts["k"] == 1)]
    assert len(top) == 1 and cad["score"].iat[0] > 0
    # a method the comparison did not run: refused in one line
    line = refused(main, [*cli_args(tiny_world_folder, tmp_path / "y"), "--compare", str(cmp_out), "--methods", "coar"])
    assert "coar" in line, line


# -- targeted erasure: contrastive scores, per-layer budgets, mean-ablation (issue 17, item 3) ---------------------
def _frame(concept: str, scores: dict[str, float], method: str = "cad") -> pd.DataFrame:
    return pd.DataFrame({"method": method, "variant": method, "concept": concept, "component": list(scores),
                         "score": list(scores.values()), "objective": "erase"})


def test_contrastive_ranking_puts_the_specific_unit_first_where_the_plain_one_does_not():
    # "general" moves every concept's J most; "specific" moves only red's: the plain ranking starts with the general
    # unit, the contrastive one with the specific unit, and the general unit's contrast is not positive (never ablated)
    units = ["general", "specific", "other"]
    red = _frame("red", dict(zip(units, [1.0, 0.6, 0.1])))
    others = [_frame(c, dict(zip(units, [1.0, 0.0, 0.1]))) for c in ("blue", "circle", "striped")]
    plain = ed.Ranking.from_frame(red)
    assert plain.components[0] == "general"
    c = er.contrastive_ranking(red, others)
    assert c.components[0] == "specific" and c.name == "cad+contrastive" and c.concept == "red"
    assert c.info["references"] == ["blue", "circle", "striped"]
    assert c.top(3).components == ("specific",)  # the general unit's contrast is < 0, the other unit's 0
    # L1 normalization: a concept whose J is 100x larger weighs the same
    big = [_frame(c_, dict(zip(units, [100.0, 0.0, 10.0]))) for c_ in ("blue",)]
    small = [_frame(c_, dict(zip(units, [1.0, 0.0, 0.1]))) for c_ in ("blue",)]
    assert er.contrastive_ranking(red, big).scores == pytest.approx(er.contrastive_ranking(red, small).scores)
    with pytest.raises(ValueError, match="cover"):
        er.contrastive_ranking(red, [_frame("blue", {"general": 1.0})])
    with pytest.raises(ValueError, match="at least one"):
        er.contrastive_ranking(red, [])


def test_per_layer_ranking_spreads_every_top_k_evenly_over_layers():
    scores = {"a0": 9.0, "a1": 8.0, "a2": 7.0, "a3": 6.0, "b0": 3.0, "b1": 2.0, "c0": 1.0, "c1": -1.0, "a4": 0.0}
    r = ed.Ranking.from_frame(_frame("red", scores))
    layer_of = {u: u[0] for u in scores}
    assert r.top(3).components == ("a0", "a1", "a2")  # the global ranking takes one layer only
    p = er.per_layer_ranking(r, layer_of)
    assert p.name == "ablate:cad+per-layer" and p.info["n_layers"] == 3
    assert p.top(3).components == ("a0", "b0", "c0")  # round 1: every layer's best, best first
    assert p.top(5).components == ("a0", "b0", "c0", "a1", "b1")
    assert p.top(7).components == ("a0", "b0", "c0", "a1", "b1", "a2", "a3")  # c and b ran out: a takes their share
    assert p.top(len(scores)).k == 7  # a score <= 0 is never ablated, and it is last
    assert set(p.components) == set(scores) and sorted(p.scores) == sorted(scores.values())


def test_mean_ablation_edit_replaces_units_by_their_anchor_means(tiny_world_model, tiny_red_objective):
    from interp.core.generation import generate
    from interp.core.interventions import compile_plan, unit_means

    m, obj = tiny_world_model, tiny_red_objective
    before = m.state_fingerprint()
    comps = m.components("neuron", kind="ff.net.0", layer="mid.a0.tb0")
    means = er.ablation_means(obj, comps)
    plan = compile_plan(m, comps)
    assert set(means) == {s.path for s in plan.sites["unet"]}
    direct = unit_means(m, plan, obj.anchor_ids[obj.image_index], obj.x_t, obj.t)  # the anchor prompts, not targets
    assert all(torch.equal(means[k], direct[k]) for k in means)
    targets = unit_means(m, plan, obj.target_ids[obj.image_index], obj.x_t, obj.t)
    assert not all(torch.equal(means[k], targets[k]) for k in means)
    chosen = tuple(comps.addresses[:8])
    prompts = ["a red circle", "a blue square"]
    mean_edit = ed.AblationEdit(chosen, means=means)
    assert mean_edit.mode == "mean" and "mean" in mean_edit.record()["mechanism"]
    with torch.no_grad():
        with mean_edit.apply(m) as edited:
            got = edited.generate(prompts, steps=2)
        sub = compile_plan(m, list(chosen))
        want = generate(m, prompts, steps=2, plan=sub, mult=torch.zeros(1, len(chosen)), means=means)
        with ed.AblationEdit(chosen).apply(m) as edited:
            zero = edited.generate(prompts, steps=2)
        with ed.AblationEdit(chosen, means={k: torch.zeros_like(v) for k, v in means.items()}).apply(m) as edited:
            zero_means = edited.generate(prompts, steps=2)
    assert torch.equal(got, want) and not torch.equal(got, zero)
    assert torch.allclose(zero_means, zero, atol=1e-6)  # mean-ablation towards zero means is zero-ablation
    with pytest.raises(ValueError, match="no means"):
        with ed.AblationEdit(chosen, means={}).apply(m):
            pass
    assert_weights_equal(m, before)


def test_cli_targeted_rankings_and_mean_ablation(tiny_world_folder, tmp_path, no_figures):
    from analyses.erasure_curves import main

    out = tmp_path / "targeted"
    argv = cli_args(tiny_world_folder, out) + ["--methods", "cad", "--rankings", "plain", "contrastive", "per-layer",
                                               "contrastive-per-layer", "--contrast", "blue", "circle",
                                               "--ablation", "mean"]
    assert main(argv) == 0
    curves = pd.read_parquet(out / "results.parquet")
    assert set(curves["method"]) == {"cad", "cad+contrastive", "cad+per-layer", "cad+contrastive+per-layer",
                                     er.RANDOM}
    assert json.loads((out / "meta.json").read_text())["model_unchanged"] is True


@pytest.mark.slow  # several seconds: two erasure runs
def test_cli_ranks_with_an_objective_through_generation_or_a_timestep_band(tiny_world_folder, tmp_path, no_figures):
    """The rankings' objective is an option: the classifier objective (the judge through generation) and J averaged
    over a high-noise band of timesteps both rank, and the run records which."""
    from analyses.erasure_curves import main

    for objective, timesteps in (("classifier", ["300"]), ("erase", ["700", "800", "900"])):
        out = tmp_path / objective
        argv = cli_args(tiny_world_folder, out) + ["--methods", "cad", "--objective", objective,
                                                   "--timesteps", *timesteps, "--gen-steps", "2"]
        assert main(argv) == 0
        meta = json.loads((out / "meta.json").read_text())
        ranking = meta["ranking_config"]
        assert ranking["objective"] == objective and ranking["timesteps"] == [int(t) for t in timesteps]
        assert "cad" in set(pd.read_parquet(out / "results.parquet")["method"])


# -- erasure with SAE features and the artifact rate (issue 40, item 3) ---------------------------------------------
def test_cli_erases_sae_features_and_reports_the_artifact_rate(tiny_world_folder, tmp_path, refused, no_figures):
    """``--granularity feature --sae FOLDER``: a tiny SAE trained here (seconds) is attached before the components
    are selected, its latents are ranked and ablated, and every point has an artifact rate in [0, 1]."""
    from analyses.erasure_curves import main
    from interp.core.features import collect_activations, save_sae, train_sae

    site = "unet.mid_block.attentions.0.transformer_blocks.0.ff"
    model = interp.load_model(str(tiny_world_folder))
    acts = collect_activations(model, site, ["a red circle", "a blue square"], seeds=(0,), steps=2)
    save_sae(train_sae(acts, k=4, expansion=2, steps=20, batch=32, site=site), tmp_path / "sae")
    out = tmp_path / "run"
    assert main([*cli_args(tiny_world_folder, out), "--granularity", "feature", "--sae", str(tmp_path / "sae"),
                 "--no-progress", "--threads", "1"]) == 0
    curves = pd.read_parquet(out / "results.parquet")
    assert "artifact_rate" in set(curves["metric"]) and set(curves["method"]) == {"cad", "maskgrad", er.RANDOM}
    pts = pd.read_csv(out / "tables" / "points.csv")
    assert "artifact_rate" in pts and pts["artifact_rate"].between(0, 1).all()
    art = curves[curves["metric"] == "artifact_rate"]["value"]
    assert art.between(0, 1).all()
    assert json.loads((out / "meta.json").read_text())["ranking_config"]["sae"] == [str(tmp_path / "sae")]
    assert "Artifact rate" in (out / "index.html").read_text()
    assert "need their sparse autoencoder" in refused(main, [*cli_args(tiny_world_folder, tmp_path / "x"),
                                                             "--granularity", "feature"])
    tangent = str(Path(__file__).resolve().parents[1] / "docs" / "examples" / "tangent_method.py")  # no features
    assert "do not attribute SAE features" in refused(main, [*cli_args(tiny_world_folder, tmp_path / "x"),
                                                             "--granularity", "feature", "--sae",
                                                             str(tmp_path / "sae"), "--plugin", tangent,
                                                             "--methods", "tangent"])


def test_artifact_rate_counts_images_with_an_unreadable_attribute():
    """An image is an artifact when some attribute's top class is below the threshold (0.5)."""
    import types

    held = types.SimpleNamespace(prompts=pd.DataFrame({"prompt": ["a", "b", "c"]}),
                                 values={"color": ("red", "blue"), "shape": ("circle", "square", "star")})
    codes = {"top_color": torch.tensor([0.9, 0.49, 0.6]), "top_shape": torch.tensor([0.5, 0.9, 0.34])}
    assert er.ARTIFACT_THRESHOLD == 0.5
    assert er._artifacts(codes, held).tolist() == [0.0, 1.0, 1.0]
