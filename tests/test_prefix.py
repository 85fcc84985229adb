"""Prefix replay (interp.core.prefix): ablated passes replay the intact UNet upstream of their earliest ablation.

What must hold: the values equal a full pass's for every kind of component and ablation (single, joint, mean),
every objective branch layout, on the concept world's and Stable Diffusion's UNet layouts, and for causal tracing's
restorations in its corrupted run (rows on different contexts are not replayed); the replayed modules really are
not run; modules run twice per pass are never replayed; counted cost does not change.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import interp
from interp.core.components import ComponentSet
from interp.core.engine import masked_values, random_masks, single_ablation_deltas
from interp.core.objectives import Objective, ObjectiveConfig
from interp.core.prefix import frontier


def _both(obj, fn):
    """``fn()`` with replay always on (also where it would not pay) and off; the model's pass counters advance by
    the same amount either way."""
    before = dict(obj.model.counters)
    obj.replay_prefix = "always"
    on = fn()
    mid = dict(obj.model.counters)
    obj.replay_prefix = False
    try:
        off = fn()
    finally:
        obj.replay_prefix = True
    after = dict(obj.model.counters)
    assert {k: mid[k] - before.get(k, 0) for k in mid} == {k: after[k] - mid.get(k, 0) for k in after}
    return on, off


def _close(on, off, obj):
    """Equal up to rounding (the replayed pass runs at another batch size; float64 objectives make that ~1e-16):
    a wrong replay moves deltas by their own size."""
    assert obj.dtype == torch.float64
    scale = float(off.abs().max())
    err = float((on - off).abs().max())
    assert err <= 1e-9 * scale, f"replayed and full passes differ by {err:.3g} (deltas up to {scale:.3g})"
    assert scale > 0  # the ablations do change J: not a comparison of zeros


def _sample(comps, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(comps), generator=g)[:n].sort().values
    return ComponentSet([comps[int(i)] for i in idx])


@pytest.mark.parametrize("granularity", ["neuron", "head", "layer"])
@pytest.mark.parametrize("anchor", ["shared", "frozen"])
def test_single_ablations_equal_full_passes(tiny_world_model, tiny_world_model_f64, granularity, anchor):
    obj = Objective(tiny_world_model_f64, "red", ObjectiveConfig(n_images=2, timesteps=(300, 700), anchor=anchor,
                                                                 dtype="float64"))
    comps = ComponentSet([c for c in tiny_world_model.space.select(granularity) if c.model == "unet"])
    comps = _sample(comps, 40) if len(comps) > 40 else comps
    on, off = _both(obj, lambda: single_ablation_deltas(obj, comps, chunk=8))
    _close(on, off, obj)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_joint_and_mean_ablations_equal_full_passes(tiny_world_model, tiny_world_model_f64, mode):
    obj = Objective(tiny_world_model_f64, "red", ObjectiveConfig(n_images=2, timesteps=(300, 700), dtype="float64"))
    comps = tiny_world_model.space.select("neuron")  # the text encoder's units too: those passes replay nothing
    comps = _sample(comps, 60, seed=1)
    masks = random_masks(12, len(comps), 0.05, seed=3)
    on, off = _both(obj, lambda: masked_values(obj, comps, masks, mode=mode, chunk=4))
    _close(on, off, obj)
    on, off = _both(obj, lambda: single_ablation_deltas(obj, comps, mode=mode, chunk=16))
    _close(on, off, obj)


def test_replayed_modules_are_not_run(tiny_world_model, tiny_objective_config):
    # an objective of its own: the session's shared one may hold a replay cache other tests filled, and this test's
    # sweep leaves one
    model, obj = tiny_world_model, Objective(tiny_world_model, "red", tiny_objective_config)
    late = ComponentSet(list(model.space.select("neuron", block="up_blocks.2"))[-3:])
    assert all(c.module.startswith("unet.up_blocks.") for c in late)
    calls = {"down": 0, "up": 0}
    hooks = [model.unet.down_blocks[0].resnets[0].conv1.register_forward_hook(lambda *a: calls.__setitem__("down", calls["down"] + 1)),
             model.unet.up_blocks[-1].resnets[-1].conv2.register_forward_hook(lambda *a: calls.__setitem__("up", calls["up"] + 1))]
    try:
        single_ablation_deltas(obj, late)
    finally:
        for h in hooks:
            h.remove()
    # one intact pass fills the replay cache; the ablated pass runs the last up block but not the first down block
    # (hooks on their children: a skipped module's own hooks may still see its replayed output)
    assert calls == {"down": 1, "up": 2}


def test_frontier_stops_before_the_site_and_never_replays_a_module_run_twice(tiny_world_model):
    model = tiny_world_model
    ff = [c for c in model.space.select("neuron") if c.module.startswith("unet.up_blocks.1.") and
          c.module.endswith("ff.net.2")][0]
    front = frontier(model, model.events[("out", ff.module)])
    for path in ("unet.conv_in", "unet.time_embedding", "unet.down_blocks.0", "unet.mid_block", "unet.up_blocks.0"):
        assert path in front
    assert not any(ff.module.startswith(p + ".") or ff.module == p for p in front)
    conv = [c for c in model.space.select("neuron") if c.module == "unet.up_blocks.2.resnets.0.conv2"][0]
    front = frontier(model, model.events[("out", conv.module)])
    assert "unet.up_blocks.2.resnets.0.norm2" in front
    assert "unet.up_blocks.2.resnets.0.nonlinearity" not in front  # called more than once per pass
    assert model.calls["unet.up_blocks.2.resnets.0.nonlinearity"] == 3  # on the input, the time embedding, norm2


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_stable_diffusion_layouts_replay_exactly(tmp_path, style):
    from interp.testing import tiny_stable_diffusion

    model = interp.load_model(tiny_stable_diffusion(tmp_path / style, style), device="cpu")
    obj = Objective(model, "a red car", ObjectiveConfig(n_images=2, timesteps=(300, 700), gen_steps=2,
                                                                  dtype="float64"))
    comps = _sample(model.space.select("neuron", model="unet"), 48, seed=2)
    on, off = _both(obj, lambda: single_ablation_deltas(obj, comps, chunk=6))
    _close(on, off, obj)

    def traced():  # causal tracing's restorations replay the corrupted run, on these layouts too
        df = interp.attribute("tracing", model, "a red car", comps[:12], objective=obj, n_noise=1, maps=False)
        return torch.tensor(df["score"].to_numpy(float), dtype=torch.float64)

    obj.warm()  # the intact anchor branch tracing reads, computed (and counted) once before either run
    on, off = _both(obj, traced)
    _close(on, off, obj)
    assert obj._replay_context is not None  # the replay cache was filled from the corrupted run


def test_replayed_fraction_is_the_flops_a_replayed_pass_saves(tiny_world_model, tiny_objective_config):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from interp.core.interventions import compile_plan
    from interp.studies.plan import replayed_fraction

    # an objective of its own: this test switches replay and fills the cache (the session's shared one stays as it is)
    model, obj = tiny_world_model, Objective(tiny_world_model, "red", tiny_objective_config)
    for comp in (model.space.select("neuron", block="up_blocks.1")[0], model.space.select("neuron", block="mid_block")[5]):
        plan, mult = compile_plan(model, [comp]), torch.zeros(1, 1)
        obj.replay_prefix = "always"  # one ablation alone would not pay for the fill pass
        obj.values(plan, mult)  # fills the replay cache, so that only the ablated pass is counted below
        flops = {}
        for replay in ("always", False):
            obj.replay_prefix = replay
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
                obj.values(plan, mult)
            flops[replay] = fc.get_total_flops()
        obj.replay_prefix = True
        assert 0 < 1 - flops["always"] / flops[False] == pytest.approx(replayed_fraction(model, [comp]), abs=0.01)


@pytest.mark.slow  # ~16 s: every restoration of a traced run, replayed and in full
def test_causal_tracing_replays_its_corrupted_run_exactly(tiny_world_model):
    """Restorations in the corrupted run replay that run's own upstream (one cached context per noise draw): the
    scores and maps equal full passes', at fewer FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_world_model
    # 4 mask rows per pass (8 UNet rows each): rows that start at the same site fill a batch of their own
    obj = Objective(model, "red", ObjectiveConfig(n_images=2, timesteps=(300, 700), dtype="float64", max_batch=32))
    comps = ComponentSet([*_sample(model.space.select("neuron", model="unet"), 30, seed=4),
                          *model.space.select("layer", model="unet")[:6]])
    runs, flops = [], []
    try:
        for replay in ("always", False):
            obj.replay_prefix = replay
            method = interp.methods.REGISTRY["tracing"](n_noise=2, chunk=8)
            with FlopCounterMode(display=False) as fc:
                df, maps = dataclasses.astuple(method.run(model, "red", comps, objective=obj))
            runs.append(torch.tensor([*df["score"], *maps["score"]], dtype=torch.float64))
            flops.append(fc.get_total_flops())
    finally:
        obj.replay_prefix = True
    on, off = runs
    assert on.shape == off.shape and len(on) > len(comps)  # the maps' rows too
    _close(on, off, obj)
    assert flops[0] < 0.95 * flops[1]  # the text-encoder map (most of these FLOPs) has nothing to replay
    assert obj._replay_context is not None  # the last cache was a corrupted run's, not the intact model's


def test_rows_on_different_contexts_are_not_replayed(tiny_world_model, tiny_world_model_f64):
    """A call whose rows run on different replaced contexts has no shared upstream: it runs full passes."""
    from interp.core.interventions import compile_plan

    model = tiny_world_model
    obj = Objective(tiny_world_model_f64, "red", ObjectiveConfig(n_images=2, timesteps=(300, 700), dtype="float64"))
    comps = ComponentSet(list(model.space.select("neuron", block="up_blocks.1"))[:2])
    g = torch.Generator().manual_seed(0)
    ctx = torch.cat([obj.ctx_target, obj.ctx_target + 0.5 * torch.randn(obj.ctx_target.shape, generator=g,
                                                                         dtype=obj.ctx_target.dtype)])
    assert obj._shared_context(ctx) is False
    assert obj._shared_context(torch.cat([obj.ctx_target, obj.ctx_target])) is not False
    plan, mult = compile_plan(model, comps), torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=obj.dtype)
    on, off = _both(obj, lambda: obj.values(plan, mult, target_context=ctx) - obj.values(plan, mult * 0 + 1,
                                                                                         target_context=ctx))
    _close(on, off, obj)


def test_rows_group_by_their_first_site_and_small_groups_fill_a_batch():
    from types import SimpleNamespace

    from interp.core.interventions import Plan

    plan = Plan(None, {"unet": [SimpleNamespace(columns=[0]), SimpleNamespace(columns=[1]),
                                SimpleNamespace(columns=[2])]}, "unet")
    first = [0, 0, 0, 1, 2, 2, 2, 2]
    mult = torch.ones(len(first), 3)
    mult[torch.arange(len(first)), torch.tensor(first)] = 0
    mult[7, 0] = 0.5  # a row is grouped by its earliest intervened site
    mult = torch.cat([mult, torch.ones(1, 3)])  # a row that changes nothing comes last
    as_lists = lambda groups: [g.tolist() for g in groups]  # noqa: E731
    assert as_lists(Objective._replay_groups(plan, mult)) == [[0, 1, 2, 7], [3], [4, 5, 6], [8]]
    assert as_lists(Objective._replay_groups(plan, mult, min_rows=3)) == [[0, 1, 2, 7], [3, 4, 5, 6], [8]]
    assert Objective._replay_groups(plan, mult, min_rows=9) is None  # one group: nothing to split


def test_replay_runs_only_where_it_saves_flops(tiny_world_model, tiny_world_model_f64):
    """A call replays only if what it skips outweighs the intact pass that fills the cache, counted whether or not
    an earlier call filled it (so that the choice, and each value's rounding, depends on the call alone): one late
    ablation runs a full pass, also after the cache is filled; eight replay."""
    from torch.utils.flop_counter import FlopCounterMode

    from interp.core.interventions import compile_plan
    from interp.core.prefix import module_flops, replay_pays, upstream_share

    model = tiny_world_model
    obj = Objective(tiny_world_model_f64, "red", ObjectiveConfig(n_images=2, timesteps=(300, 700), dtype="float64"))
    late = ComponentSet(list(model.space.select("neuron", block="up_blocks.2"))[-8:])
    plan = compile_plan(model, late)

    def run(mult):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            J = obj.values(plan, mult)
        return J, fc.get_total_flops()

    one = torch.ones(1, len(late), dtype=obj.dtype)
    one[0, -1] = 0
    one_J, full = run(one)  # one ablation: a full pass, and nothing cached
    assert obj._replayed == {} and full > 0
    many = torch.ones(len(late), len(late), dtype=obj.dtype) - torch.eye(len(late), dtype=obj.dtype)
    J, flops = run(many)  # eight ablations of late units pay for the fill pass: replayed, cache filled
    assert obj._replayed and flops < len(late) * full
    assert torch.allclose(J[-1], one_J[0], rtol=1e-12, atol=0)
    again_J, again = run(one)
    assert again == full and torch.equal(again_J, one_J)  # the same choice as with the empty cache
    obj.replay_prefix = "always"
    forced_J, forced = run(one)
    assert forced < full and torch.allclose(forced_J, one_J, rtol=1e-12, atol=0)
    # the rule itself: skipped FLOPs against the fill pass's rows
    per, total = module_flops(model)
    assert total > 0 and per["unet"] == total and per["unet.up_blocks.2"] < total
    front = ("unet.conv_in", "unet.down_blocks.0")
    share = upstream_share(model, front)
    assert share == pytest.approx((per["unet.conv_in"] + per["unet.down_blocks.0"]) / total)
    assert replay_pays(model, [front], [10], fill_rows=int(10 * share) - 1)
    assert not replay_pays(model, [front], [10], fill_rows=int(10 * share) + 1)
    with pytest.raises(ValueError, match="replay_prefix"):
        obj.replay_prefix = "yes"


def test_the_replay_cache_stays_within_its_budget(tiny_world_model, tiny_world_model_f64):
    """The cache holds at most ``replay_budget`` bytes, counted beforehand from per-module output sizes on the meta
    device (equal to the real outputs'): a call whose outputs to cache would be more runs full passes, bitwise as
    with replay off, and a fill drops what the call does not need first."""
    from interp.core.interventions import compile_plan
    from interp.core.prefix import fill_bytes, intact_outputs, module_bytes, nbytes
    from interp.studies.plan import eval_shape, replay_reserve

    model = tiny_world_model
    obj = Objective(tiny_world_model_f64, "red", ObjectiveConfig(n_images=2, timesteps=(300,), dtype="float64"))
    rows = obj.n_samples * obj.branches
    per = module_bytes(model)
    paths = ["unet.down_blocks.1", "unet.mid_block", "unet.up_blocks.0.attentions.0"]
    real = intact_outputs(model, paths, obj.x_t.repeat(2, 1, 1, 1), obj.t.repeat(2),
                          torch.cat([obj.ctx_target[obj.image_index], obj.ctx_anchor[obj.image_index]]))
    assert {p: nbytes(real[p]) for p in paths} == {p: rows * per[p] for p in paths}
    sets = {b: _sample(ComponentSet(list(model.space.select("neuron", block=b))), 6) for b in ("mid_block",
                                                                                               "up_blocks.1")}
    plans = {b: compile_plan(model, c) for b, c in sets.items()}
    M = torch.ones(6, 6, dtype=obj.dtype) - torch.eye(6, dtype=obj.dtype)
    # what each call caches: the frontier of its earliest unit (its 6 masks are one batch), in the float64 copy
    # of the model that the objective runs
    need = {b: fill_bytes(obj.model, frontier(model, model.events[(p.sites["unet"][0].event, p.sites["unet"][0].path)]),
                          rows) for b, p in plans.items()}
    assert need["mid_block"] < need["up_blocks.1"]
    obj.replay_prefix = False
    full = {b: obj.values(p, M) for b, p in plans.items()}
    obj.replay_prefix = "always"
    replayed = {b: obj.values(p, M) for b, p in plans.items()}
    assert sum(nbytes(v) for v in obj._replayed.values()) > need["up_blocks.1"]  # both calls' outputs kept
    obj.release()
    obj.replay_budget = need["up_blocks.1"] - 1  # the later units' call would cache more than the budget
    got = {b: obj.values(p, M) for b, p in plans.items()}
    assert torch.equal(got["up_blocks.1"], full["up_blocks.1"])  # not replayed: the full passes' values, bitwise
    assert torch.equal(got["mid_block"], replayed["mid_block"])  # replayed as before
    assert sum(nbytes(v) for v in obj._replayed.values()) == need["mid_block"]
    obj.replay_budget = need["up_blocks.1"]  # fits alone: the mid block's outputs are dropped to make room
    assert torch.equal(obj.values(plans["up_blocks.1"], M), replayed["up_blocks.1"])
    assert sum(nbytes(v) for v in obj._replayed.values()) <= obj.replay_budget
    # the preflight holds what a run's cache may reach: its frontiers' outputs, at most the budget
    assert replay_reserve(model, sets["up_blocks.1"], eval_shape(model, obj.config)) >= need["up_blocks.1"]
    assert replay_reserve(model, sets["up_blocks.1"],
                          eval_shape(model, ObjectiveConfig(kind="classifier", n_images=2))) == 0
