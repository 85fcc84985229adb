"""Every registered attribution method: one schema, determinism, the sign convention, state left untouched (also
after errors), cost metadata, caching and resuming; and known answers on objectives and models built so that the
right attribution is known exactly."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import MID, Killed, LinearFF, ProductFF, assert_untouched, killed_at_second_masked_call

import interp
import interp.core.interventions as interventions_mod
import interp.core.objectives as objectives_mod
import interp.methods.tracing as tracing_mod
from interp.core.interventions import Patch, compile_plan, run_unet
from interp.core.objectives import Objective, ObjectiveConfig
from interp.core.results import COLUMNS, DTYPES, MAP_COLUMNS, MAP_DTYPES, Cost, validate
from interp.methods import REGISTRY

# One worker runs the module: its module fixtures (every method's conformance run, the planted model) are built once.
pytestmark = pytest.mark.xdist_group("methods")

RES = "unet.down_blocks.1.resnets.0"
OPTIONS = {"coar": {"n_masks": 60}, "tracing": {"n_noise": 1}, "ablation": {"chunk": 8}, "cad": {}, "ig": {"steps": 4},
           "maskgrad": {"n_masks": 4}, "midpoint": {}, "screen": {"fraction": 0.25, "screen_options": (("n_masks", 4),)}}
METHODS = sorted(REGISTRY)


def conformance_components(model):
    """A small set every method handles: GEGLU units, conv channels, text-encoder neurons and two whole layers."""
    return interp.ComponentSet([model.space.parse(a) for a in (
        [f"{MID}.ff.net.0[{j}]" for j in (0, 3, 7, 12, 20, 33)]
        + [f"{RES}.conv1[{c}]" for c in (0, 2, 5)]
        + ["text_encoder.encoder.layers.1.mlp.fc1[4]", "text_encoder.encoder.layers.2.mlp.fc1[9]"]
        + ["unet.down_blocks.1.attentions.0.transformer_blocks.0", "text_encoder.encoder.layers.0"]
    )])


def run(method, model, obj, comps, **kw):
    return interp.attribute(method, model, obj.concept, comps, objective=obj, **{**OPTIONS.get(method, {}), **kw})


@pytest.fixture(scope="module")
def tiny_conformance_frames(tiny_world_model, tiny_red_objective):
    """One run of every method on the conformance set (computed once; several tests read it)."""
    comps = conformance_components(tiny_world_model)
    before = tiny_world_model.state_fingerprint()
    counters = {}
    frames = {}
    for name in METHODS:
        c0 = dict(tiny_world_model.counters)
        frames[name] = run(name, tiny_world_model, tiny_red_objective, comps)
        counters[name] = {k: tiny_world_model.counters[k] - c0.get(k, 0) for k in tiny_world_model.counters}
    return frames, comps, before, counters


def test_registry_is_complete():
    assert set(REGISTRY) >= {"cad", "ablation", "coar", "tracing"}
    assert REGISTRY["cad"].capabilities.gradients and not REGISTRY["ablation"].capabilities.gradients
    assert REGISTRY["ablation"].capabilities.exact and not REGISTRY["cad"].capabilities.exact


# -- conformance over the registry ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_schema_and_cost_metadata(method, tiny_conformance_frames, tiny_red_objective):
    frames, comps, _, counters = tiny_conformance_frames
    df = frames[method]
    validate(df)
    assert list(df.columns) == COLUMNS
    assert {c: str(df[c].dtype) for c in COLUMNS if DTYPES[c] != "string"} == \
        {c: d for c, d in DTYPES.items() if d != "string"}
    main = df[df["variant"] == method]
    assert list(main["component"]) == comps.addresses
    assert (df["method"] == method).all() and (df["concept"] == "red").all() and (df["objective"] == "erase").all()
    assert (df["n_samples"] == tiny_red_objective.n_samples).all() and (df["seed"] == 0).all()
    assert df["config_hash"].nunique() == 1
    assert np.isfinite(main["score"]).all() and (main["score"] != 0).any()
    meta = df.attrs["meta"]
    for key in ("cost", "variant_costs", "n_components", "versions", "objective", "config"):
        assert key in meta, key
    cost = Cost.from_dict(meta["cost"])  # typed: the record validates itself
    assert meta["n_components"] == len(comps) and cost.seconds > 0
    assert cost.forward_evals > 0
    assert cost.forward_evals * tiny_red_objective.rows_per_eval == counters[method]["unet_rows"]
    assert cost.backward_evals * tiny_red_objective.rows_per_eval == counters[method].get("unet_rows_grad", 0)
    if REGISTRY[method].capabilities.gradients:  # cad, and the gradient estimators beyond first order
        assert cost.backward_evals > 0
    else:  # ablation, coar, tracing: forward passes only
        assert cost.backward_evals == 0
    if method == "cad":
        assert cost.forward_evals == cost.backward_evals == 1
    if method == "ablation":
        assert cost.forward_evals == len(comps)  # one evaluation of J per component
    assert (df.groupby("variant").size() == len(comps)).all()  # one row per component and estimate, nothing else


@pytest.mark.parametrize("method", METHODS)
def test_maps_are_a_frame_of_their_own(method, tiny_world_model, tiny_red_objective):
    """A method with the ``maps`` capability returns them from ``maps(...)``, in their own schema, and ``run(...)``
    gives both frames of one run; the method object keeps no run (a second ``maps`` reads the store, or computes
    again without one); the others refuse by name."""
    comps = conformance_components(tiny_world_model)
    m = REGISTRY[method](**OPTIONS.get(method, {}))
    if not m.capabilities.maps:
        with pytest.raises(ValueError, match="makes no maps"):
            m.maps(tiny_world_model, "red", comps, objective=tiny_red_objective)
        return
    before = dict(tiny_world_model.counters)
    run = m.run(tiny_world_model, "red", comps, objective=tiny_red_objective)
    assert dict(tiny_world_model.counters) != before  # computed: nothing is kept on the object
    df, maps = run.scores, run.maps
    assert vars(m) == {"config": m.config}
    again = dict(tiny_world_model.counters)
    pd.testing.assert_frame_equal(m.maps(tiny_world_model, "red", comps, objective=tiny_red_objective), maps)
    assert dict(tiny_world_model.counters) != again  # no store: the same run, computed again
    assert list(maps.columns) == MAP_COLUMNS and {c: str(maps[c].dtype) for c in MAP_COLUMNS} == MAP_DTYPES
    assert set(maps["axis"]) == {"timestep", "token"} and len(df) == len(comps)
    assert set(maps.loc[maps["axis"] == "timestep", "position"]) == {300, 700}
    assert (maps.loc[maps["axis"] == "timestep", "model_part"] == "unet").all()
    assert (maps.loc[maps["axis"] == "token", "model_part"] == "text_encoder").all()
    assert 0 in set(maps.loc[maps["axis"] == "token", "position"])  # the last subject token
    assert np.isfinite(maps["score"]).all() and (maps["config_hash"] == df["config_hash"].iat[0]).all()


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_under_a_fixed_seed(method, tiny_conformance_frames, tiny_world_model, tiny_red_objective):
    frames, comps, before, _ = tiny_conformance_frames
    again = run(method, tiny_world_model, tiny_red_objective, comps)
    pd.testing.assert_frame_equal(again.reset_index(drop=True), frames[method].reset_index(drop=True),
                                  check_exact=True)
    assert_untouched(tiny_world_model, before)


@pytest.mark.parametrize("method", METHODS)
def test_state_untouched_after_a_run(method, tiny_conformance_frames, tiny_world_model, tiny_red_objective):
    _, comps, before, _ = tiny_conformance_frames
    assert_untouched(tiny_world_model, before)  # after the shared runs of every method
    m = REGISTRY[method](**{**OPTIONS.get(method, {}), "seed": 7})
    m.attribute(tiny_world_model, tiny_red_objective.concept, comps[:4], objective=tiny_red_objective)
    assert_untouched(tiny_world_model, before)  # and after this method's own fresh run
    assert vars(m) == {"config": m.config}  # nor is the method object changed: it keeps no run state


@pytest.mark.parametrize("method", METHODS)
def test_state_untouched_after_an_error_inside_a_method(method, tiny_conformance_frames, tiny_world_model,
                                                        tiny_red_objective, monkeypatch):
    """The second UNet call of the method fails inside its nnsight trace (a patch of the wrong shape)."""
    frames, comps, before, _ = tiny_conformance_frames
    real = run_unet
    calls = {"n": 0, "fail_at": 2}

    def failing(model, x, t, context, plan=None, mult=None, means=None, patches=None, saves=(), skips=None):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            bad = {**(patches or {}), "unet.conv_norm_out": Patch(torch.zeros(2, 3, 5), torch.tensor(True))}
            return real(model, x, t, context, plan, mult, means, bad, saves, skips)
        return real(model, x, t, context, plan, mult, means, patches, saves, skips)

    monkeypatch.setattr(objectives_mod, "run_unet", failing)
    monkeypatch.setattr(interventions_mod, "run_unet", failing)  # behind run_unet_in_passes
    planted = r"the patch of unet.conv_norm_out does not fit its output"  # the planted patch's error, no other
    try:
        run(method, tiny_world_model, tiny_red_objective, comps)
    except ValueError as err:
        if not re.search(planted, str(err)):
            raise
        assert calls["n"] == 2
    else:  # the method made a single UNet call: fail that one instead
        assert calls["n"] == 1
        calls.update(n=0, fail_at=1)
        with pytest.raises(ValueError, match=planted):
            run(method, tiny_world_model, tiny_red_objective, comps)
    monkeypatch.undo()
    assert_untouched(tiny_world_model, before)
    # the engine is not left in a broken state: the method runs again and gives the same answer
    again = run(method, tiny_world_model, tiny_red_objective, comps)
    np.testing.assert_array_equal(again["score"].to_numpy(), frames[method]["score"].to_numpy())


@pytest.mark.parametrize("method", METHODS)
def test_cache_is_reused_without_recomputing(method, tiny_conformance_frames, tiny_world_model, tiny_red_objective,
                                             tmp_path):
    frames, comps, _, _ = tiny_conformance_frames
    first = run(method, tiny_world_model, tiny_red_objective, comps, store=tmp_path)
    np.testing.assert_array_equal(first["score"].to_numpy(), frames[method]["score"].to_numpy())
    counters = dict(tiny_world_model.counters)
    second = run(method, tiny_world_model, tiny_red_objective, comps, store=tmp_path)
    assert dict(tiny_world_model.counters) == counters, "the cached result was recomputed"
    validate(second)
    pd.testing.assert_frame_equal(second, first, check_exact=True)
    assert second.attrs["meta"]["cost"]["forward_evals"] == first.attrs["meta"]["cost"]["forward_evals"]
    # another configuration is another entry
    run(method, tiny_world_model, tiny_red_objective, comps, store=tmp_path, seed=1)
    assert tiny_world_model.counters["unet_rows"] > counters["unet_rows"]
    entries = [d.name for d in tmp_path.iterdir() if d.is_dir()]
    # screen-then-verify stores its screening method's result next to its own (one entry per seed each)
    assert len([e for e in entries if e.startswith(f"{method}-")]) == 2
    assert len(entries) == (4 if method == "screen" else 2)


# -- sign convention and independent checks -------------------------------------------------------------------------
def test_ablation_scores_are_minus_the_measured_change(tiny_conformance_frames, tiny_world_model_f64):
    _, comps, _, _ = tiny_conformance_frames
    # float64: single-unit effects are ~1e-3 of J, a float32 difference of two J values would be noise
    obj = Objective(tiny_world_model_f64, "red", ObjectiveConfig(n_images=2, timesteps=(300, 700), dtype="float64"))
    score = run("ablation", obj.model, obj, comps)["score"].to_numpy()
    plan = compile_plan(obj.model, comps)
    for i in (0, 7, len(comps) - 1):
        M = torch.ones(1, len(comps), dtype=torch.float64)
        M[0, i] = 0
        with torch.no_grad():
            delta = float(obj.values(plan, M).mean() - obj.intact.mean())
        assert delta != 0
        assert score[i] == pytest.approx(-delta, rel=1e-7)


def test_cad_scores_equal_the_multiplier_gradient(tiny_conformance_frames, tiny_world_model, tiny_red_objective):
    """Scaling a GEGLU unit's column of ff.net.2 (or a conv filter and bias) by m is scaling the unit by m, so CAD's
    w * dJ/dw summed over the unit's weights is dJ/dm at m = 1, computed here independently through the engine."""
    frames, comps, _, _ = tiny_conformance_frames
    obj = tiny_red_objective
    units = [i for i, c in enumerate(comps) if c.model == "unet" and c.granularity == "neuron"]
    sub = interp.ComponentSet([comps[i] for i in units])
    plan = compile_plan(tiny_world_model, sub)
    mult = torch.ones(1, len(sub), requires_grad=True)
    grad, = torch.autograd.grad(obj.values(plan, mult).mean(), mult)
    cad = frames["cad"]["score"].to_numpy()[units]
    np.testing.assert_allclose(cad, grad[0].double().numpy(), rtol=2e-3, atol=1e-12)
    assert (np.sign(cad) == np.sign(grad[0].numpy())).all()


# -- known answers: an objective linear in the GEGLU units ------------------------------------------------------------
LINEAR_CFG = ObjectiveConfig(kind="amplify", n_images=2, timesteps=(300, 700), dtype="float64")


def test_linear_objective_known_answers(tiny_world_model_f64):
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(tiny_world_model_f64.module(f"{MID}.ff.net.2").out_features, generator=gen)
    obj = LinearFF(tiny_world_model_f64, "red", LINEAR_CFG, MID, v)
    comps = obj.model.components("neuron", kind="ff.net.0", layer="mid.a0.tb0")
    n = len(comps)
    assert n == 64
    abl = run("ablation", obj.model, obj, comps)["score"].to_numpy()
    cad = run("cad", obj.model, obj, comps)["score"].to_numpy()
    assert np.abs(abl).max() > 0
    np.testing.assert_allclose(cad, abl, rtol=1e-5, atol=1e-12 * np.abs(abl).max())
    # linearity: ablating a random set changes J by the sum of the single effects
    plan = compile_plan(obj.model, comps)
    Z = torch.rand(1, n, generator=gen) < 0.3
    with torch.no_grad():
        joint = float(obj.values(plan, (~Z).double()).mean() - obj.intact.mean())
    assert joint == pytest.approx(-abl[Z[0].numpy()].sum(), rel=1e-6)
    # every gradient estimator equals CAD on an objective linear in the multipliers (dJ/dm is constant)
    for method in sorted(set(REGISTRY) - {"ablation", "cad", "coar", "tracing"}):
        est = run(method, obj.model, obj, comps)["score"].to_numpy()
        np.testing.assert_allclose(est, abl, rtol=1e-5, atol=1e-12 * np.abs(abl).max(), err_msg=method)
    # COAR recovers the coefficients exactly and predicts held-out masks perfectly
    df = run("coar", obj.model, obj, comps, n_masks=100, alpha=0.2)
    np.testing.assert_allclose(df["score"].to_numpy(), abl, rtol=1e-5, atol=1e-9 * np.abs(abl).max())
    meta = df.attrs["meta"]
    assert not meta["underdetermined"]
    assert meta["lds_spearman"] == pytest.approx(1.0, abs=1e-9)
    assert meta["lds_pearson"] == pytest.approx(1.0, abs=1e-9)


def _planted_model(factory):
    """A model whose output feature 0 of the mid block's ff.net.2 reads one GEGLU unit only, and J reads feature 0
    only: that unit is the only component with any effect, and ablating it lowers J."""
    m = factory()
    probe = LinearFF(m, "red", LINEAR_CFG, MID, torch.zeros(16))
    idx = probe.image_index
    with torch.no_grad():
        _, saved = run_unet(probe.model, probe.x_t, probe.t, probe.ctx_target[idx], saves=[f"{MID}.ff.net.0"])
    mean_h = saved[f"{MID}.ff.net.0"].mean(dim=(0, 1))
    star = int(mean_h.abs().argmax())
    w = m.module(f"{MID}.ff.net.2").weight
    with torch.no_grad():
        w[0] = 0
        w[0, star] = 5.0 * float(torch.sign(mean_h[star]))
    v = torch.zeros(w.shape[0])
    v[0] = 1.0
    return m, star, v


@pytest.fixture(scope="module")
def planted_objective():
    """The planted model, its objective and components, built once for every method's case: read only (each case
    checks afterwards that its method left the weights, hooks and gradients as they were)."""
    from conftest import _build_tiny_world_model

    m, star, v = _planted_model(_build_tiny_world_model)
    obj = LinearFF(m, "red", LINEAR_CFG, MID, v)
    comps = obj.model.components("neuron", kind="ff.net.0", layer="mid.a0.tb0")
    return obj, comps, star, obj.model.state_fingerprint()


@pytest.mark.parametrize("method", METHODS)
def test_planted_unit_is_ranked_first(method, planted_objective):
    obj, comps, star, before = planted_objective
    opts = {"n_masks": 100, "alpha": 0.2} if method == "coar" else {}
    if method == "tracing":  # restoring the planted unit's clean state restores all of J; no other unit reaches J
        opts = {"maps": False}
    score = run(method, obj.model, obj, comps, **opts)["score"].to_numpy()
    assert int(np.argmax(score)) == star
    assert score[star] > 0  # ablating it lowers J: positive by the suite's sign convention
    others = np.delete(score, star)
    if method == "coar":  # a regression: zero up to the least-squares solve
        assert np.abs(others).max() < 1e-6 * score[star]
    elif method == "tracing":  # restored fractions: the planted unit restores everything, others nothing
        assert score[star] == pytest.approx(1.0, abs=1e-6)
        assert np.abs(others).max() < 1e-6
    else:  # no other unit can reach J at all: exact zeros, measured or by gradient
        assert (others == 0).all()
    assert_untouched(obj.model, before)  # the shared model is left as it was for the next method's case


# -- causal tracing known answers ----------------------------------------------------------------------------------
def test_tracing_restoring_the_last_text_layer_restores_everything(tiny_world_model, tiny_red_objective):
    comps = tiny_world_model.components("layer", family="text_layer")
    assert comps.addresses[-1] == "text_encoder.encoder.layers.2"
    df = run("tracing", tiny_world_model, tiny_red_objective, comps, maps=False)
    meta = df.attrs["meta"]
    assert abs(meta["j_clean"] - np.mean(meta["j_corrupted"])) > 1e-7  # the corruption matters
    score = df.set_index("component")["score"]
    # the corruption enters at the embeddings only: restoring any whole text layer restores all of it
    assert score["text_encoder.encoder.layers.2"] == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(score.to_numpy(), 1.0, atol=1e-6)
    # and the UNet's last resnet determines its output
    last = run("tracing", tiny_world_model, tiny_red_objective, ["unet.up_blocks.2.resnets.1"], maps=False)
    assert last["score"].iat[0] == pytest.approx(1.0, abs=1e-5)


def test_tracing_records_and_checks_what_its_corruption_removes(tiny_world_model, tiny_red_objective):
    """Per noise draw the share of J the corruption removes, and a warning naming the concept when a draw does not
    lower J (here: no noise at all, so J does not move)."""
    comps = ["unet.mid_block.resnets.0"]
    df = run("tracing", tiny_world_model, tiny_red_objective, comps, maps=False, n_noise=2)
    meta = df.attrs["meta"]
    expected = [(meta["j_clean"] - j) / abs(meta["j_clean"]) for j in meta["j_corrupted"]]
    assert meta["corruption_removed"] == pytest.approx(expected) and len(expected) == 2
    assert meta["corruption_valid"] == all(r >= tracing_mod.WEAK_CORRUPTION for r in expected)
    with pytest.warns(RuntimeWarning, match="corrupting the subject tokens of 'red' does not remove the concept"):
        flat = run("tracing", tiny_world_model, tiny_red_objective, comps, maps=False, noise_scale=0.0)
    assert flat.attrs["meta"]["corruption_removed"] == [0.0] and not flat.attrs["meta"]["corruption_valid"]


def test_corruption_check_wants_every_draw_to_lower_j():
    check = tracing_mod.corruption_check
    assert check(2.0, [1.0, 0.5]) == {"corruption_removed": [0.5, 0.75], "corruption_valid": True}
    assert not check(2.0, [1.0, 3.0])["corruption_valid"]  # one draw raises J: the draws disagree
    assert not check(2.0, [1.99, 1.0])["corruption_valid"]  # 0.5% removed: below WEAK_CORRUPTION
    assert check(-4.0, [-5.0])["corruption_removed"] == [0.25]  # amplify: J < 0, lower is still less concept


def test_tracing_without_noise_restores_exactly_one(tiny_world_model, tiny_red_objective):
    """noise_scale=0: the corrupted run is the clean run, so any restoration scores exactly 1. (One component per
    chunk: restored runs then have the batch size of the clean run; see the xfail below for batched chunks.)"""
    comps = interp.ComponentSet(list(tiny_world_model.components("layer", family="text_layer"))
                                + [tiny_world_model.space.parse(a) for a in (
                                    "text_encoder.encoder.layers.1.mlp.fc1[3]", f"{MID}.ff.net.0[5]",
                                    "unet.mid_block.resnets.0", f"{RES}.conv1[1]")])
    df = run("tracing", tiny_world_model, tiny_red_objective, comps, noise_scale=0.0, maps=False, chunk=1)
    assert (df["score"] == 1.0).all()


def test_tracing_without_noise_restores_exactly_one_in_batched_chunks(tiny_world_model, tiny_red_objective):
    comps = tiny_world_model.components("layer", family="block")
    df = run("tracing", tiny_world_model, tiny_red_objective, comps, noise_scale=0.0, maps=False)
    assert (df["score"] == 1.0).all()


def test_text_restoration_mechanics(tiny_world_folder):
    """Basu et al.'s text-encoder test end to end (tracing.text_restoration): a whole restored layer restores the
    images exactly; a state restored at the subject of layer l changes no earlier position, and at the last layer no
    other position of the context the UNet reads (the encoder is causal; its final layer norm is per position)."""
    from interp.core.interventions import run_text

    m = interp.load_model(str(tiny_world_folder))
    cfg = ObjectiveConfig(kind="classifier", n_images=3, gen_steps=2)
    df = tracing_mod.text_restoration(m, "red", cfg, noise_scale=10.0, n_noise=1)
    clean = df[df["position"] == "clean"].iloc[0]
    corr = df[df["position"] == "corrupted"].iloc[0]
    assert abs(clean["p_concept"] - corr["p_concept"]) > 1e-6  # the corruption matters
    rows = df[df["layer"] >= 0]
    assert len(rows) == 3 * 3 and set(rows["position"]) == set(tracing_mod.RESTORE_POSITIONS)
    whole = rows[rows["position"] == "all"]
    assert (whole["p_concept"] == clean["p_concept"]).all() and (whole["restored_p"] == 1.0).all()
    assert (whole["concept_rate"] == clean["concept_rate"]).all()
    # where the restored state goes, on the contexts themselves
    obj = Objective(m, "red", cfg)
    tr = tracing_mod._Tracer(obj, tracing_mod.TracingConfig(noise_scale=10.0, n_noise=1))
    paths = [c.module for c in m.components("layer", family="text_layer")]
    saved = run_text(m, obj.target_ids, saves=paths)[1]
    corrupted = tr.text(obj.target_ids, tr.corruption(0, 1))[0]
    i, s = 0, tr.subj[0][-1]
    moved = {}
    for path in (paths[0], paths[-1]):
        where = torch.zeros(*obj.target_ids.shape, 1, dtype=torch.bool)
        where[i, s] = True
        ctx = tr.text(obj.target_ids, {**tr.corruption(0, 1), path: Patch(saved[path], where)})[0]
        moved[path] = (ctx[i] - corrupted[i]).abs().amax(-1)
        assert (moved[path][:s] == 0).all()  # causal: nothing before the subject changes
        if path == paths[-1]:  # the last layer's restored state is the clean context at the subject
            assert torch.allclose(ctx[i, s], obj.ctx_target[i, s], atol=1e-5)
    assert (moved[paths[-1]][s + 1 :] == 0).all()  # the last layer's restored state reaches no other position
    assert (moved[paths[0]][s + 1 :] > 0).any()  # layer 0's does, through the later layers
    with pytest.raises(ValueError, match="classifier"):
        tracing_mod.text_restoration(m, "red", ObjectiveConfig(kind="erase"))
    with pytest.raises(ValueError, match="positions"):
        tracing_mod.text_restoration(m, "red", cfg, positions=("middle",))


# -- a killed run resumes from its finished chunks ---------------------------------------------------------------
def test_killed_ablation_resumes_from_its_chunks(tiny_world_model, tiny_red_objective, tmp_path, monkeypatch):
    m, obj = tiny_world_model, tiny_red_objective
    comps = m.components("neuron", kind="ff.net.0", layer="mid.a0.tb0")[:24]
    rows0 = m.counters["unet_rows"]
    scratch = run("ablation", m, obj, comps, chunk=8)
    rows_scratch = m.counters["unet_rows"] - rows0

    killed_at_second_masked_call(monkeypatch)
    with pytest.raises(Killed):
        run("ablation", m, obj, comps, chunk=8, store=tmp_path)
    monkeypatch.undo()
    (entry,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert len(list((entry / "chunks").glob("*.pt"))) == 1
    assert not (entry / "result.parquet").exists()

    rows0 = m.counters["unet_rows"]
    resumed = run("ablation", m, obj, comps, chunk=8, store=tmp_path)
    rows_resumed = m.counters["unet_rows"] - rows0
    np.testing.assert_array_equal(resumed["score"].to_numpy(), scratch["score"].to_numpy())
    np.testing.assert_array_equal(resumed["stderr"].to_numpy(), scratch["stderr"].to_numpy())
    assert rows_resumed < rows_scratch
    assert rows_resumed == rows_scratch * 2 // 3  # exactly the two unfinished chunks
    assert (entry / "result.parquet").exists()


# -- bugs found while writing these tests ---------------------------------------------------------------------------
def test_cache_distinguishes_models_with_edited_weights(tiny_world_model, tiny_objective_config, tmp_path):
    from interp.core.interventions import weights_ablated

    m = tiny_world_model
    comps = [f"{MID}.ff.net.0[{j}]" for j in (3, 30, 31)]
    first = run("ablation", m, Objective(m, "red", tiny_objective_config), comps, store=tmp_path)
    with weights_ablated(m, [f"{MID}.ff.net.2.weight[5,30]"]):  # an edit in the middle of a weight matrix
        edited = Objective(m, "red", tiny_objective_config)
        fresh = run("ablation", m, edited, comps)
        cached = run("ablation", m, edited, comps, store=tmp_path)
    assert not np.array_equal(fresh["score"].to_numpy(), first["score"].to_numpy())  # the edit matters
    np.testing.assert_array_equal(cached["score"].to_numpy(), fresh["score"].to_numpy())


def test_mean_ablation_of_weights_is_refused_not_silently_zero_ablation(tiny_world_model, tiny_red_objective):
    """A scalar weight has no mean to ablate to: mode="mean" is refused by name, never run as a zero-ablation."""
    weights = [f"{MID}.ff.net.2.weight[5,30]", f"{MID}.ff.net.2.weight[1,2]"]
    zero = run("ablation", tiny_world_model, tiny_red_objective, weights, mode="zero")
    assert zero.attrs["meta"]["mode"] == "zero" and (zero["score"] != 0).all()
    with pytest.raises(ValueError, match="scalar weights are only zero-ablated; use mode='zero'"):
        run("ablation", tiny_world_model, tiny_red_objective, weights, mode="mean")


def test_maskgrad_equals_its_analytic_expectation_on_an_interaction(tiny_world_model_f64):
    """With J = L1 * L2 (L linear in the multipliers m), E[dJ/dm_a] over Bernoulli(alpha) masks is
    g1_a E[L2] + g2_a E[L1], E[L_i] = c_i + (1 - alpha) sum_j g_ij: the mask-averaged score must match it within
    its standard error, while CAD (the gradient at m = 1) differs from it."""
    gen = torch.Generator().manual_seed(5)
    out = tiny_world_model_f64.module(f"{MID}.ff.net.2").out_features
    v1, v2 = torch.randn(out, generator=gen), torch.randn(out, generator=gen)
    cfg = ObjectiveConfig(kind="amplify", n_images=1, timesteps=(300,), dtype="float64")  # one sample: J = L1 L2 exactly
    obj = ProductFF(tiny_world_model_f64, "red", cfg, MID, v1, v2)
    comps = interp.ComponentSet(list(obj.model.components("neuron", kind="ff.net.0", layer="mid.a0.tb0"))[:6])
    plan = compile_plan(obj.model, comps)
    alpha = 0.3

    # The linear readouts' coefficients, measured from single ablations of the (exactly linear) L_i.
    n = len(comps)
    M = torch.ones(n + 1, n, dtype=torch.float64)
    M[torch.arange(1, n + 1), torch.arange(n)] = 0
    l1, l2 = obj.readouts(plan, M)
    g1, g2 = l1[0] - l1[1:], l2[0] - l2[1:]  # L(m) = c + sum_j g_j m_j, so ablating j removes g_j
    c1, c2 = l1[0] - g1.sum(), l2[0] - g2.sum()
    e1, e2 = c1 + (1 - alpha) * g1.sum(), c2 + (1 - alpha) * g2.sum()
    expected = (g1 * e2 + g2 * e1) * 1e3
    df = run("maskgrad", obj.model, obj, comps, n_masks=400, alpha=alpha, batch=50)
    score, se = df["score"].to_numpy(), df["stderr"].to_numpy()
    assert (np.abs(score - expected.numpy()) <= 4 * se + 1e-12).all(), (score, expected, se)
    cad = run("cad", obj.model, obj, comps)["score"].to_numpy()
    assert not np.allclose(cad, expected.numpy(), rtol=0.05)


def test_maskgrad_curve_rows_equal_runs_with_fewer_masks(tiny_world_model, tiny_red_objective):
    """Variant 'maskgrad@<alpha>-K<k>' is the estimate of the first k masks: the same scores as a run with
    n_masks = k, and its cost is counted as k masks. Variants are typed columns: method stays 'maskgrad'."""
    obj = tiny_red_objective
    comps = interp.ComponentSet(list(obj.model.components("neuron", kind="ff.net.2", layer="mid.a0.tb0"))[:8])
    full = run("maskgrad", obj.model, obj, comps, n_masks=6, alpha=0.2, extra_alphas=(0.05,), curve=(2, 3))
    assert set(full["method"]) == {"maskgrad"}
    est = full.drop_duplicates("variant").set_index("variant")
    assert set(est.index) == {"maskgrad", "maskgrad@0.05", "maskgrad@0.2-K2", "maskgrad@0.2-K3", "maskgrad@0.05-K2",
                              "maskgrad@0.05-K3"}, est.index
    # budget and rate as columns; the main rate's budget variants share the main estimator
    assert est.loc["maskgrad", ["budget", "mask_alpha", "estimator"]].tolist() == [6, 0.2, "maskgrad"]
    assert est.loc["maskgrad@0.2-K2", ["budget", "mask_alpha", "estimator"]].tolist() == [2, 0.2, "maskgrad"]
    assert est.loc["maskgrad@0.05-K3", ["budget", "mask_alpha", "estimator"]].tolist() == [3, 0.05, "maskgrad@0.05"]
    small = run("maskgrad", obj.model, obj, comps, n_masks=3, alpha=0.2, extra_alphas=(0.05,))
    for mine, theirs in (("maskgrad@0.2-K3", "maskgrad"), ("maskgrad@0.05-K3", "maskgrad@0.05")):
        a = full[full["variant"] == mine].sort_values("component")["score"].to_numpy()
        b = small[small["variant"] == theirs].sort_values("component")["score"].to_numpy()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
    k2 = full[full["variant"] == "maskgrad@0.2-K2"]["score"].to_numpy()
    assert not np.allclose(k2, full[full["variant"] == "maskgrad"]["score"].to_numpy(), rtol=1e-3, atol=0)
    costs = full.attrs["meta"]["variant_costs"]
    assert costs["maskgrad@0.2-K2"] == {"forward_evals": 2.0, "backward_evals": 2.0, "seconds": None}
    with pytest.raises(ValueError, match="curve"):
        run("maskgrad", obj.model, obj, comps, n_masks=4, curve=(4,))


def test_tracing_warns_when_a_corruption_barely_moves_the_objective():
    """Restored fractions divide by the clean-minus-corrupted gap; a tiny gap is named instead of blowing up silently."""
    j_clean = torch.tensor([1.0, 1.0], dtype=torch.float64)
    strong, weak = j_clean - 0.5, j_clean - 0.005
    rest = torch.tensor([[0.75, 0.75]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tracing_mod._frac(rest, strong, j_clean).item() == pytest.approx(0.5)
    with pytest.warns(RuntimeWarning, match="noise_scale"):
        tracing_mod._frac(torch.tensor([[0.9975, 0.9975]], dtype=torch.float64), weak, j_clean)


def test_screen_reuses_the_cached_screening_result(tiny_world_model, tiny_red_objective, tmp_path):
    """Screen-then-verify asks the store for its screener's result: after the screener ran, only the verification
    is computed, and the recorded cost is the screener's plus the verification's either way."""
    comps = tiny_world_model.components("neuron", family="ff", kind="ff.net.2", block="mid_block")
    opts = {"n_masks": 4, "alpha": 0.1}
    fresh = run("screen", tiny_world_model, tiny_red_objective, comps, screen_options=tuple(opts.items()),
                fraction=0.25)
    mg = run("maskgrad", tiny_world_model, tiny_red_objective, comps, store=tmp_path, **opts)
    before = tiny_world_model.counters["unet_rows"]
    sc = run("screen", tiny_world_model, tiny_red_objective, comps, store=tmp_path,
             screen_options=tuple(opts.items()), fraction=0.25)
    k = len(sc.attrs["meta"]["verified"])
    used = tiny_world_model.counters["unet_rows"] - before
    assert used == k * tiny_red_objective.rows_per_eval  # the verification only: no maskgrad pass
    assert sc.attrs["meta"]["cost"]["forward_evals"] == mg.attrs["meta"]["cost"]["forward_evals"] + k
    assert sc.attrs["meta"]["cost"]["forward_evals"] == fresh.attrs["meta"]["cost"]["forward_evals"]
    np.testing.assert_array_equal(sc["score"].to_numpy(), fresh["score"].to_numpy())
