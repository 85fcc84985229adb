"""Concept edits on a tiny concept-world model: restoration, closed forms, selection rules, evaluation, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import changed_weights

import interp
from interp.core.objectives import ObjectiveConfig
from interp.core.results import make_frame
from interp.studies import editing as ed
from interp.world.classifier import ConceptClassifier
from interp.world.model import ModelConfig, build_pipeline

torch.set_num_threads(1)

# One worker runs the module: its module fixtures (the model folder, the model, its attribution scores) are built once.
pytestmark = pytest.mark.xdist_group("editing")

FAST = ObjectiveConfig(kind="erase", n_images=2, timesteps=(300, 700))
PROMPTS = ["a red solid circle on black", "a photo of a blue striped square on white"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny pipeline and an untrained classifier saved as a concept-world folder."""
    path = tmp_path_factory.mktemp("tiny-world")
    build_pipeline(ModelConfig.tiny()).save_pretrained(path / "pipeline")
    clf = ConceptClassifier(width=4)
    clf(torch.zeros(1, 3, 16, 16))
    clf.save(path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return interp.load_model(str(folder))


def same_weights(model, before) -> bool:
    return not changed_weights(model, before)


changed = changed_weights


@pytest.fixture(scope="module")
def erase_scores(model):
    return ed.cad_weight_scores(model, "red", "erase", FAST)


def test_weight_edits_restore_bitwise_also_on_error(model, erase_scores):
    before = model.state_fingerprint()
    edits = [erase_scores.edit(0.1), ed.diff_quickfix(model, "red"),
             ed.cad_weight_scores(model, "circle", "amplify", ObjectiveConfig(kind="amplify", n_images=2,
                                                                              timesteps=(500,))).edit(0.1)]
    for edit in edits:
        assert edit.n_changed > 0
        with edit.apply(model) as edited:
            assert changed(model, before), f"{edit.name} changed nothing inside its context"
            edited.generate(PROMPTS[:1], steps=2)
        assert same_weights(model, before), f"{edit.name} left weights changed"
        with pytest.raises(RuntimeError, match="boom"):
            with edit.apply(model):
                raise RuntimeError("boom")
        assert same_weights(model, before), f"{edit.name} left weights changed after an exception"
        rec = edit.record()
        assert rec["n_weights"] == edit.n_changed and rec["edit"] == edit.name
        json.dumps(rec, default=str)


def test_ablation_edit_touches_no_weight(model):
    before = model.state_fingerprint()
    ranking = ed.rank_components(model, "red", "cad", objective=FAST)
    edit = ranking.top(10)
    assert 0 < edit.k <= 10 and all(s > 0 for s in edit.scores)
    with edit.apply(model) as edited:
        assert edited.plan is not None and edited.mult.shape == (1, edit.k) and not edited.mult.any()
        a = edited.generate(PROMPTS, steps=2)
        assert same_weights(model, before)
    with pytest.raises(ValueError, match="inside"):
        with edit.apply(model):
            raise ValueError("inside")
    assert same_weights(model, before)
    b = interp.generate(model, PROMPTS, steps=2)
    assert not torch.equal(a, b)  # the ablation is seen by generation through the handle
    rec = edit.record()
    assert rec["components"] == list(edit.components) and rec["method"] == "cad" and rec["n_components"] == edit.k


def test_zero_component_edits_change_nothing(model, erase_scores):
    ref = interp.generate(model, PROMPTS, seed=3, steps=3)
    ranking = ed.rank_components(model, "red", "cad", objective=FAST)
    for edit in (ed.AblationEdit(()), ranking.top(0), erase_scores.edit(0.0)):
        with edit.apply(model) as edited:
            out = edited.generate(PROMPTS, seed=3, steps=3)
        assert torch.equal(out, ref), edit.label


def test_quickfix_normal_equations(model):
    sol, info = ed.diff_quickfix_solution(model, "red")
    assert sol.W_star.dtype == torch.float64
    eye = torch.eye(sol.K.shape[0], dtype=torch.float64)
    lhs = sol.W_star @ (sol.lam * eye + sol.K @ sol.K.T)
    rhs = sol.lam * sol.W0 + sol.V @ sol.K.T
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)
    assert sol.residual() < 1e-12 and sol.lam == ed.QUICKFIX_LAMBDA
    assert info["module"].endswith("encoder.layers.0.self_attn.out_proj")
    # keys: the last subject token and every later position of each concept prompt (16 tokens, padding included)
    assert info["n_keys"] == sum(16 - (p.split().index("red") + 1) for p, _ in info["pairs"])
    # preservation keys keep the same normal equations (with augmented K and V)
    sol_p, info_p = ed.diff_quickfix_solution(model, "circle", preserve=3)
    assert info_p["n_preserve_keys"] == 3 * 16 and sol_p.residual() < 1e-12
    # known answer: values equal to the unedited outputs of the keys leave W unchanged
    same = ed.quickfix_solve(sol.W0, sol.K, sol.W0 @ sol.K)
    torch.testing.assert_close(same.W_star, sol.W0, rtol=1e-9, atol=1e-9)


def test_cad_erase_per_row_rule(model, erase_scores):
    ratio = 0.1
    edit = erase_scores.edit(ratio)
    params = dict(model.parameters())
    before = {n: params[n].detach().clone() for n in erase_scores.scores}
    assert set(erase_scores.scores) == {n for n in params if n.startswith("unet.") and
                                        (n.endswith("ff.net.0.proj.weight") or n.endswith("ff.net.2.weight"))}
    with edit.apply(model):
        after = {n: params[n].detach().clone() for n in erase_scores.scores}
    for name, s in erase_scores.scores.items():
        k = ed.per_row_count(ratio, s.shape[1])
        assert k == int(np.floor(ratio * s.shape[1] + 1e-9)) and k > 0
        zeroed = (after[name] == 0) & (before[name] != 0)
        assert torch.equal(after[name] != before[name], zeroed)  # the only change is zeroing
        assert (s[zeroed] > 0).all(), "a non-positive score was erased"
        n_pos = (s > 0).sum(1)
        assert torch.equal(zeroed.sum(1), torch.minimum(n_pos, torch.tensor(k)))
        for r in range(s.shape[0]):  # the zeroed entries are the row's top scores
            if zeroed[r].any() and (~zeroed[r] & (s[r] > 0)).any():
                assert s[r][zeroed[r]].min() >= s[r][~zeroed[r]].max()
    assert ed.per_row_count(0.001, 64) == 0 and ed.per_row_count(0.07, 100) == 7
    neg = ed.select_per_row(torch.tensor([[3.0, -1.0, -2.0, 0.5]]), 2, "negative")
    assert neg.tolist() == [[False, True, True, False]]


def test_welch_t_known_answer():
    comp = pd.DataFrame({"component": ["a", "b"], "model_part": "unet", "family": "ff", "block": "mid_block",
                         "layer": "mid", "depth": 0, "kind": "ff.net.0", "unit": [0, 1], "granularity": "neuron"})

    def frame(score, se, concept):
        return make_frame(comp, score, se, method="cad", model="toy", concept=concept, objective="erase",
                          n_samples=4, seed=0, config_hash="0" * 16)

    t = ed.welch_t(frame([2.0, 1.0], [0.5, 0.5], "red"), [frame([0.0, 1.0], [0.5, 0.5], "blue")])
    np.testing.assert_allclose(t.to_numpy(), [2.0 / np.sqrt(0.5), 0.0])


def test_evaluation_columns(model):
    cfg = ed.EvalConfig(n_target=3, n_alone=2, n_other=6, steps=2)
    base = ed.baseline(model, "red", cfg)
    assert set(base.held.prompts["set"]) == {"target", "alone", "other"}
    assert not (base.held.prompts.query("set == 'other'")["color"] == "red").any()
    res = ed.evaluate_edit(model, ed.diff_quickfix(model, "red"), config=cfg, base=base)
    assert list(res.summary.columns) == ed.SUMMARY_COLUMNS and len(res.summary) == 1
    assert list(res.per_value.columns) == ed.PER_VALUE_COLUMNS and len(res.per_value) > 0
    row = res.summary.iloc[0]
    assert row["concept"] == "red" and row["attribute"] == "color" and row["n_images"] == 11
    for col in ("target_before", "target_after", "target_alone_before", "target_alone_after"):
        assert 0 <= row[col] <= 1
    assert np.isfinite(row["fd_before"]) and np.isfinite(row["fd_after"]) and row["eval_seconds"] > 0
    none = ed.evaluate_edit(model, ed.AblationEdit((), concept="red"), config=cfg, base=base)
    r0 = none.summary.iloc[0]
    assert r0["target_after"] == r0["target_before"] and r0["fd_after"] == r0["fd_before"]
    assert torch.equal(none.after.images, base.judged.images)
    table = ed.sweep_table([res, none])
    assert len(table) == 2
    assert ed.tradeoff_plot(table).axes and ed.image_grid([res, none], n=4).axes
    assert ed.frechet_distance(base.reference, base.reference) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_sqrtm():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 5)), rng.normal(1.0, 2.0, size=(300, 5)) @ rng.normal(size=(5, 5))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(linalg.sqrtm(s1 @ s2)))
    assert ed.frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)


def test_main_writes_every_output(folder, tmp_path, monkeypatch):
    """Every output, with every UNet pass (attributions, held-out generations) within --max-batch rows."""
    from helpers import unet_rows

    from analyses.edit_concepts import main

    rows = unet_rows(monkeypatch)
    out = tmp_path / "run"
    code = main(["--model", str(folder), "--concepts", "red", "--edits", "cad-erase", "diff-quickfix",
                 "diff-quickfix-preserve", "coar-edit", "ablate:maskgrad", "--k", "3", "--ratios", "0.1",
                 "--components", "ff", "attn2", "--images", "6", "--steps", "2", "--attr-images", "1",
                 "--max-batch", "4", "--out", str(out)])
    assert code == 0
    assert rows and max(rows) <= 4, sorted(set(rows))
    for f in ("index.html", "meta.json", "edits.json", "tables/tradeoff.csv", "tables/per_value.csv",
              "tables/edits.csv", "figures/tradeoff.png", "figures/tradeoff-drawn.png", "figures/grid-red.png"):
        assert (out / f).exists() and (out / f).stat().st_size > 0, f
    table = pd.read_csv(out / "tables" / "tradeoff.csv")
    assert set(table["edit"]) == {"cad-erase", "diff-quickfix", "diff-quickfix-preserve", "coar-edit",
                                  "ablate:maskgrad"}
    assert json.loads((out / "meta.json").read_text())["model_unchanged"] is True
    html = (out / "index.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 and "Trade-off" in html


@pytest.mark.parametrize("argv, message", [
    (["--concepts", "reddish"], "not a concept word"),
    (["--edits", "erase-everything"], "unknown edit"),
    (["--edits", "ablate:nonsense"], "unknown method"),
    (["--k", "-1"], "--k"),
    (["--components", "everything"], "unknown component set"),
])
def test_main_rejects_bad_arguments(argv, message, refused, tmp_path):
    from analyses.edit_concepts import main

    assert message in refused(main, [*argv, "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
