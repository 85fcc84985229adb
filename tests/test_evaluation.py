"""Known-answer tests of interp.report.evaluation on small synthetic result frames (no model)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from interp.core.results import concat, make_frame
from interp.report import evaluation as ev


def components(n: int, per_layer: int = 10, text_layers: int = 0) -> pd.DataFrame:
    """A component table in the schema's left columns: ``text_layers`` text-encoder layers, then UNet layers."""
    rows = []
    for i in range(n):
        layer_no = i // per_layer
        if layer_no < text_layers:
            depth = layer_no
            part, block, family, kind = "text_encoder", "text_encoder", "text_mlp", "mlp.fc1"
            layer = f"text_model.encoder.layers.{depth}"
        else:
            depth = layer_no - text_layers
            part, block, family, kind = "unet", "mid_block", "ff", "ff.net.0"
            layer = f"mid_block.attentions.0.transformer_blocks.{depth}"
        rows.append({"component": f"{part}.{layer}.{kind}[{i % per_layer}]", "model_part": part, "family": family,
                     "block": block, "layer": layer, "depth": depth, "kind": kind, "unit": i % per_layer,
                     "granularity": "neuron"})
    return pd.DataFrame(rows)


def frame(comp, score, method, concept="red", meta=None):
    return make_frame(comp, score, method=method, model="toy", concept=concept, objective="erase", n_samples=1,
                      seed=0, config_hash="0" * 16, meta=meta)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    comp = components(400, per_layer=50, text_layers=2)
    ref = rng.normal(size=len(comp))
    df = concat([
        frame(comp, ref, "ablation", meta={"cost": {"forward_evals": 400, "seconds": 2.5}}),
        frame(comp, ref.copy(), "copy"),
        frame(comp, -ref, "negated", meta={"cost": {"forward_evals": 1, "backward_evals": 1}}),
        frame(comp, np.random.default_rng(100).normal(size=len(comp)), "random"),  # independent of ref
    ])
    return df, ref, comp


def row(table, method, concept="red"):
    sel = table[(table["method"] == method) & (table["concept"] == concept)]
    assert len(sel) == 1
    return sel.iloc[0]


def test_correlations_known_answers(world):
    df, _, _ = world
    table = ev.correlations(df, n_boot=300)
    assert list(table.columns) == ev.CORR_COLUMNS
    assert set(table["method"]) == {"copy", "negated", "random"}  # the reference is not compared with itself
    for stat in ("pearson", "spearman", "kendall"):
        copy, neg, rnd = row(table, "copy"), row(table, "negated"), row(table, "random")
        assert copy[stat] == pytest.approx(1.0)
        assert copy[f"{stat}_lo"] <= 1.0 + 1e-12 and copy[f"{stat}_hi"] >= 1.0 - 1e-9
        assert neg[stat] == pytest.approx(-1.0)
        assert neg[f"{stat}_lo"] <= -1.0 + 1e-9 and neg[f"{stat}_hi"] >= -1.0 - 1e-12
        assert abs(rnd[stat]) < 0.15
        assert rnd[f"{stat}_lo"] < 0.0 < rnd[f"{stat}_hi"]
        assert rnd[f"{stat}_lo"] <= rnd[stat] <= rnd[f"{stat}_hi"]
    assert (table["n"] == 400).all()


def test_correlations_point_estimates_match_scipy(world):
    df, ref, _ = world
    rnd = df.loc[df["method"] == "random", "score"].to_numpy()
    r = row(ev.correlations(df, n_boot=0), "random")
    assert r["pearson"] == pytest.approx(stats.pearsonr(rnd, ref)[0])
    assert r["spearman"] == pytest.approx(stats.spearmanr(rnd, ref)[0])
    assert r["kendall"] == pytest.approx(stats.kendalltau(rnd, ref)[0])


def test_constant_scores_give_nan_not_an_error(world):
    _, ref, comp = world
    df = concat([frame(comp, ref, "ablation"), frame(comp, np.zeros(len(comp)), "flat")])
    r = row(ev.correlations(df, n_boot=50), "flat")
    assert np.isnan([r["pearson"], r["spearman"], r["kendall"], r["pearson_lo"], r["kendall_hi"]]).all()


def test_no_shared_components_gives_n_zero():
    a, b = components(20), components(20)
    b["component"] = b["component"] + "x"
    df = concat([frame(a, np.arange(20.0), "ablation"), frame(b, np.arange(20.0), "other")])
    r = row(ev.correlations(df, n_boot=10), "other")
    assert r["n"] == 0 and np.isnan(r["spearman"])


def test_missing_reference_is_a_clear_error(world):
    df, _, _ = world
    with pytest.raises(ValueError, match="no rows of the reference method 'truth'.*'copy'"):
        ev.correlations(df, reference="truth", n_boot=10)


def test_resampled_ranks_equal_scipy_rankdata_with_ties():
    rng = np.random.default_rng(3)
    values = np.round(rng.normal(size=300), 1)  # many ties
    idx = rng.integers(0, 300, size=(40, 300))
    np.testing.assert_allclose(ev._resampled_ranks(values, idx), stats.rankdata(values[idx], axis=1))


@pytest.mark.parametrize("n", [4, 60, 448, 1000])
def test_resampled_kendall_equals_scipy_with_ties(n):
    rng = np.random.default_rng(n)
    x = np.round(rng.normal(size=n), 1)  # ties in x, in y, in both, and repeated points in every resample
    y = np.round(x + rng.normal(size=n), 1)
    idx = rng.integers(0, n, size=(50, n))
    want = np.array([ev._quiet(stats.kendalltau, x[i], y[i]) for i in idx])
    got = ev._resampled_kendall(x, y, idx)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(ev._resampled_kendall(np.ones(n), y, idx[:3])).all()  # constant x: undefined, as scipy says


def test_bootstrap_is_cheap_at_full_size():
    rng = np.random.default_rng(1)
    comp = components(2000, per_layer=100)
    ref = rng.normal(size=2000)
    df = concat([frame(comp, ref, "ablation"), frame(comp, ref + rng.normal(size=2000), "noisy")])
    t0 = time.perf_counter()
    r = row(ev.correlations(df, n_boot=1000), "noisy")
    assert time.perf_counter() - t0 < 30  # ~1 s on one free core; the bound only catches a per-resample loop
    assert r["pearson_lo"] < r["pearson"] < r["pearson_hi"]
    assert r["pearson"] == pytest.approx(1 / np.sqrt(2), abs=0.05)


def test_correlations_by_layer_orders_text_encoder_first(world):
    df, _, _ = world
    table = ev.correlations_by_layer(df, n_boot=50)
    copy = table[table["method"] == "copy"]
    assert list(copy["model_part"]) == ["text_encoder"] * 2 + ["unet"] * 6
    assert list(copy["depth"]) == [0, 1, 0, 1, 2, 3, 4, 5]
    assert (copy["n"] == 50).all() and np.allclose(copy["spearman"], 1.0)
    blocks = ev.correlations_by_layer(df, level="block", n_boot=20)
    assert set(blocks["block"]) == {"text_encoder", "mid_block"}
    with pytest.raises(ValueError, match="level"):
        ev.correlations_by_layer(df, level="unit")


def test_topk_copy_is_perfect(world):
    df, _, _ = world
    table = ev.topk_agreement(df)
    copy = table[table["method"] == "copy"]
    assert len(copy) == 6 and (copy["precision"] == 1.0).all()
    assert list(copy.loc[copy["side"] == "positive", "k"]) == [4, 20, 40]  # round(0.01/0.05/0.10 * 400)
    neg = table[table["method"] == "negated"]
    assert (neg["precision"] == 0.0).all()  # the top of -x is the bottom of x


def test_topk_by_hand():
    comp = components(10)
    ref = np.array([10, 9, 8, 7, 6, 5, 4, 3, 2, 1], float) - 5.5  # top-2: c0, c1; bottom-2: c9, c8
    meth = np.array([9, 1, 10, 0, 0, 0, 0, 0, -3, -2], float)  # top-2: c2, c0; bottom-2: c8, c9
    df = concat([frame(comp, ref, "ablation"), frame(comp, meth, "m")])
    table = ev.topk_agreement(df, fractions=(0.2, 0.01))
    got = {(r.side, r.fraction): (r.k, r.precision) for r in table.itertuples()}
    assert got[("positive", 0.2)] == (2, 0.5)
    assert got[("negative", 0.2)] == (2, 1.0)
    assert got[("positive", 0.01)] == (1, 0.0)  # k = max(1, round(0.1)) = 1: c2 vs c0
    assert got[("negative", 0.01)] == (1, 0.0)  # c8 vs c9


def test_lds_exactly_linear_is_one():
    rng = np.random.default_rng(2)
    names = [f"c{i}" for i in range(30)]
    effect = pd.Series(rng.normal(size=30), index=names)
    masks = rng.random((60, 30)) < 0.2
    j = 3.0 - masks @ effect.to_numpy()
    # a shuffled index and an extra, never-masked component must not matter
    scores = pd.concat([effect.sample(frac=1.0, random_state=0), pd.Series({"unmasked": 7.0})])
    out = ev.lds(scores, masks, names, j, 3.0)
    assert out["spearman"] == pytest.approx(1.0) and out["pearson"] == pytest.approx(1.0)
    assert out["n_masks"] == 60
    flipped = ev.lds(-effect, masks, names, j, 3.0)  # the sign convention: ablating a positive component lowers J
    assert flipped["pearson"] == pytest.approx(-1.0)


def test_lds_missing_component_is_named():
    masks = np.eye(3, dtype=bool)
    with pytest.raises(ValueError, match=r"lack 1 .*'b'"):
        ev.lds(pd.Series({"a": 1.0, "c": 2.0}), masks, ["a", "b", "c"], np.arange(3.0), 0.0)
    with pytest.raises(ValueError, match="shape"):
        ev.lds(pd.Series({"a": 1.0}), masks, ["a"], np.arange(3.0), 0.0)


def test_lds_table_per_concept_and_alpha():
    rng = np.random.default_rng(4)
    comp = components(20)
    effect = rng.normal(size=20)
    names = list(comp["component"])
    partial = comp.iloc[:10]
    df = concat([frame(comp, effect, "ablation"), frame(comp, rng.normal(size=20), "random"),
                 frame(partial, effect[:10], "half")])
    heldout = {}
    for alpha in (0.05, 0.2):
        masks = rng.random((40, 20)) < alpha
        heldout[("red", alpha)] = {"masks": masks, "components": names, "j": 1.0 - masks @ effect, "j_intact": 1.0}
    heldout[("absent", 0.1)] = heldout[("red", 0.05)]  # a concept without rows is skipped
    with pytest.raises(ValueError, match="lack 10"):
        ev.lds_table(df, heldout)
    table = ev.lds_table(df, heldout, missing="skip")
    assert list(table.columns) == ["concept", "method", "variant", "alpha", "lds_spearman", "lds_pearson", "n_masks"]
    assert set(table["method"]) == {"ablation", "random"} and len(table) == 4
    assert np.allclose(table.loc[table["method"] == "ablation", "lds_pearson"], 1.0)
    zero = ev.lds_table(df, heldout, missing="zero", methods=["half"])
    assert len(zero) == 2 and (zero["lds_pearson"] > 0).all()


def test_lds_versus_is_a_paired_bootstrap_of_the_difference():
    rng = np.random.default_rng(5)
    comp = components(20)
    names = list(comp["component"])
    effect = rng.normal(size=20)
    noisy = effect + 0.3 * rng.normal(size=20)
    df = concat([frame(comp, effect, "exact"), frame(comp, noisy, "coar"), frame(comp, noisy.copy(), "same"),
                 frame(comp.iloc[:10], effect[:10], "half")])
    masks = rng.random((200, 20)) < 0.2
    heldout = {("red", 0.2): {"masks": masks, "components": names, "j": 1.0 - masks @ effect, "j_intact": 1.0}}
    out = ev.lds_versus(df, heldout, "coar", n_boot=300)
    assert set(out["method"]) == {"exact", "same"}  # the baseline itself and partial scorers are left out
    lds = ev.lds_table(df, heldout, missing="skip").set_index("method")["lds_spearman"]
    ex, same = out.set_index("method").loc["exact"], out.set_index("method").loc["same"]
    assert ex["difference"] == pytest.approx(lds["exact"] - lds["coar"]) and ex["lds_spearman"] == pytest.approx(1.0)
    assert 0 < ex["difference_lo"] <= ex["difference"] <= ex["difference_hi"]  # exact beats noisy, clearly
    # identical predictions: the pairing makes every resampled difference exactly 0
    assert same["difference"] == 0 and same["difference_lo"] == 0 and same["difference_hi"] == 0
    # the vectorized Spearman is scipy's
    a, b = rng.normal(size=(3, 50)), rng.normal(size=(3, 50))
    assert np.allclose(ev._row_spearman(a, b), [stats.spearmanr(x, y)[0] for x, y in zip(a, b)])


def test_cost_table_reads_meta(world):
    df, _, _ = world
    table = ev.cost_table(df)
    assert list(table.columns) == ["concept", "method", "variant", "forward_evals", "backward_evals", "seconds"]
    abl, neg, cp = row(table, "ablation"), row(table, "negated"), row(table, "copy")
    assert (abl["forward_evals"], abl["backward_evals"], abl["seconds"]) == (400, 0, 2.5)
    assert (neg["forward_evals"], neg["backward_evals"]) == (1, 1)
    assert np.isnan([cp["forward_evals"], cp["backward_evals"], cp["seconds"]]).all()
    single = frame(components(5), np.arange(5.0), "cad", meta={"cost": {"forward_evals": 3}})
    assert ev.cost_table(single).iloc[0][["method", "forward_evals"]].tolist() == ["cad", 3.0]
    # a budget variant's cost rides in its method run's variant_costs: a row of its own, under the same method
    coar = frame(components(5), np.arange(5.0), "coar",
                 meta={"cost": {"forward_evals": 10}, "variant_costs": {"coar@4": {"forward_evals": 4}}})
    rows = ev.cost_table(coar)[["method", "variant", "forward_evals", "backward_evals"]].to_numpy().tolist()
    assert rows == [["coar", "coar", 10.0, 0.0], ["coar", "coar@4", 4.0, 0.0]]


def test_summary_sentences_pick_best_spearman():
    table = pd.DataFrame({
        "concept": ["red", "red", "circle"], "method": ["cad", "coar", "cad"], "variant": ["cad", "coar", "cad"],
        "n": [10, 10, 10],
        "pearson": [0.95, 0.5, np.nan], "spearman": [0.91, 0.6, np.nan],
        "spearman_lo": [0.88, 0.4, np.nan], "spearman_hi": [0.93, 0.7, np.nan],
    })
    out = ev.summary_sentences(table)
    assert out[1] == ("For concept 'red', CAD agrees best with true ablation: Spearman r = 0.91 [0.88, 0.93] "
                      "(Pearson 0.95).")
    assert "circle" in out[0] and "no method" in out[0]
    # budget variants and screen-then-verify (whose top scores are true ablation's own) do not compete
    more = pd.concat([table, pd.DataFrame({
        "concept": ["red", "red"], "method": ["screen", "coar"], "variant": ["screen", "coar@10"], "n": [10, 10],
        "pearson": [0.99, 0.99],
        "spearman": [0.99, 0.98], "spearman_lo": [0.9, 0.9], "spearman_hi": [1.0, 1.0]})], ignore_index=True)
    assert ev.summary_sentences(more)[1] == out[1]
    assert "screen-then-verify agrees best" in ev.summary_sentences(more, exclude=())[1]
