"""The intervention engine against plain PyTorch: ablations equal weight edits, batched masks equal single runs,
patching is exact, gradients equal autograd's, weights and hooks are untouched (also after errors), memory stays
flat, errors are clear; and the same engine on a real (tiny, random) Stable Diffusion pipeline."""

from __future__ import annotations

import copy
import gc
import json

import numpy as np
import pytest
import torch
from helpers import assert_no_hooks, assert_weights_equal

import interp
from interp.core.components import UnknownComponentError
from interp.core.interventions import (
    Patch,
    compile_plan,
    parameters_requiring_grad,
    run_text,
    run_unet,
    unit_means,
    weights_ablated,
)
from interp.core.objectives import NonFiniteObjectiveError, Objective, ObjectiveConfig
from interp.core.results import validate
from interp.world.vocab import OutOfVocabularyError

MID = "unet.mid_block.attentions.0.transformer_blocks.0"
RES = "unet.down_blocks.1.resnets.0"
TXT = "text_encoder.encoder.layers.1"


def inputs(obj):
    idx = obj.image_index
    return obj.x_t, obj.t, obj.ctx_target[idx], obj.ctx_anchor[idx]


def plain_unet(unet, x, t, ctx):
    return unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]


def rel(path: str) -> str:
    return path.split(".", 1)[1]


def assert_frozen(model):
    for n, p in model.parameters():
        assert not p.requires_grad, f"{n} requires grad"
        assert p.grad is None, f"{n} has a .grad"


# -- (a) ablation through the engine == editing weights in a copy -------------------------------------------------
def _zero_row(path, row, bias=True):
    def edit(root):
        mod = root.get_submodule(rel(path))
        mod.weight[row] = 0
        if bias and mod.bias is not None:
            mod.bias[row] = 0
    return edit


def _zero_cols(path, cols):
    def edit(root):
        root.get_submodule(rel(path)).weight[:, cols] = 0
    return edit


HEAD_D = 8  # tiny model: 16 features / 2 heads in the UNet's attention

UNET_CASES = {
    "attn2.to_q neuron": (f"{MID}.attn2.to_q[3]", _zero_row(f"{MID}.attn2.to_q", 3)),
    "ff.net.0.proj value half": (f"{MID}.ff.net.0.proj[5]", _zero_row(f"{MID}.ff.net.0.proj", 5)),
    "ff.net.0.proj gate half": (f"{MID}.ff.net.0.proj[69]", _zero_row(f"{MID}.ff.net.0.proj", 69)),
    "GEGLU hidden unit": (f"{MID}.ff.net.0[7]", _zero_cols(f"{MID}.ff.net.2", 7)),
    "ff.net.2 neuron": (f"{MID}.ff.net.2[4]", _zero_row(f"{MID}.ff.net.2", 4)),
    "conv channel": (f"{RES}.conv1[2]", _zero_row(f"{RES}.conv1", 2)),
    "attention head": (f"{MID}.attn2[1]", _zero_cols(f"{MID}.attn2.to_out.0", slice(HEAD_D, 2 * HEAD_D))),
    "attn1 to_out neuron": ("unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0[6]",
                            _zero_row("unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0", 6)),
}
# the component set every case is ablated from (so that each ablation is one column among several)
UNET_SET = [a for a, _ in UNET_CASES.values()]


@pytest.mark.parametrize("case", list(UNET_CASES))
def test_unet_ablation_equals_weight_edit(tiny_world_model, tiny_red_objective, case):
    m = tiny_world_model
    address, edit = UNET_CASES[case]
    assert m.module(f"{MID}.attn2").heads * HEAD_D == m.module(f"{MID}.attn2.to_out.0").in_features
    plan = compile_plan(m, UNET_SET)
    col = plan.components.index(address)
    mult = torch.ones(1, len(UNET_SET))
    mult[0, col] = 0
    x, t, ctx, _ = inputs(tiny_red_objective)
    with torch.no_grad():
        eps, _ = run_unet(m, x, t, ctx, plan, mult)
        base = plain_unet(m.unet, x, t, ctx)
        eps_ones, _ = run_unet(m, x, t, ctx, plan, torch.ones(1, len(UNET_SET)))
        edited = copy.deepcopy(m.unet)
        edit(edited)
        ref = plain_unet(edited, x, t, ctx)
    torch.testing.assert_close(eps_ones, base, rtol=0, atol=1e-6)  # all-ones multipliers change nothing
    assert (eps - base).abs().max() > 1e-6, "the ablation had no effect: the test would be vacuous"
    torch.testing.assert_close(eps, ref, rtol=0, atol=1e-6)


TEXT_CASES = {
    "mlp.fc1 neuron": (f"{TXT}.mlp.fc1[5]", _zero_row(f"{TXT}.mlp.fc1", 5)),
    "self_attn.q_proj neuron": (f"{TXT}.self_attn.q_proj[2]", _zero_row(f"{TXT}.self_attn.q_proj", 2)),
    "text head": ("text_encoder.encoder.layers.0.self_attn[1]",
                  _zero_cols("text_encoder.encoder.layers.0.self_attn.out_proj", slice(8, 16))),
}


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_text_encoder_ablation_equals_weight_edit(tiny_world_model, tiny_red_objective, case):
    m = tiny_world_model
    address, edit = TEXT_CASES[case]
    comps = [a for a, _ in TEXT_CASES.values()]
    plan = compile_plan(m, comps)
    mult = torch.ones(1, len(comps))
    mult[0, plan.components.index(address)] = 0
    ids = tiny_red_objective.target_ids
    with torch.no_grad():
        out, _ = run_text(m, ids, plan, mult)
        edited = copy.deepcopy(m.text_encoder)
        edit(edited)
        ref = edited(ids)[0]
        base = m.text_encoder(ids)[0]
    assert (out - base).abs().max() > 1e-6
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("address", [f"{MID}.ff.net.0[7]", f"{RES}.conv1[2]"])
def test_mean_ablation_sets_the_unit_to_its_mean(tiny_world_model, tiny_red_objective, address):
    m, obj = tiny_world_model, tiny_red_objective
    c = m.space.parse(address)
    plan = compile_plan(m, [address])
    x, t, ctx, _ = inputs(obj)
    ids = obj.target_ids[obj.image_index]
    means = unit_means(m, plan, ids, x, t)
    # the mean, measured independently with a plain hook
    seen = []
    h = m.module(c.module).register_forward_hook(lambda mod, a, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            plain_unet(m.unet, x, t, m.text_encoder(ids)[0])
    finally:
        h.remove()
    act = seen[0]
    axis = 1 if act.dim() == 4 else -1
    mu = act.movedim(axis, -1).reshape(-1, act.shape[axis]).mean(0)[c.index]
    edited = copy.deepcopy(m.unet)

    def hook(mod, a, out):
        out = out.clone()
        if axis == 1:
            out[:, c.index] = mu
        else:
            out[..., c.index] = mu
        return out

    edited.get_submodule(rel(c.module)).register_forward_hook(hook)
    with torch.no_grad():
        eps, _ = run_unet(m, x, t, ctx, plan, torch.zeros(1, 1), means)
        ref = plain_unet(edited, x, t, ctx)
    torch.testing.assert_close(eps, ref, rtol=1e-5, atol=1e-6)


# -- (b) a batch of masks == single runs ---------------------------------------------------------------------------
def test_batched_masks_equal_single_runs(tiny_world_model, tiny_red_objective):
    # float64: the erase objective is a small difference of two predictions; exact agreement needs the precision
    cfg64 = ObjectiveConfig(n_images=2, timesteps=(300, 700), dtype="float64")
    obj = Objective(tiny_world_model, tiny_red_objective.concept, cfg64)
    m = obj.model
    assert m is not tiny_world_model and m.dtype == torch.float64
    comps = (list(m.components("neuron", kind="ff.net.0", layer="mid.a0.tb0").addresses[:8])
             + [f"{MID}.attn2[0]", f"{RES}.conv1[1]", f"{RES}.conv1[3]", "unet.mid_block.resnets.1",
                f"{TXT}.mlp.fc1[0]", f"{TXT}.mlp.fc1[9]", "text_encoder.encoder.layers.0"])
    plan = compile_plan(m, comps)
    assert plan.parts == {"unet", "text_encoder"}
    gen = torch.Generator().manual_seed(0)
    M = (torch.rand(5, len(comps), generator=gen) > 0.3).float()
    M[0] = 1  # one intact row
    layer0 = comps.index("text_encoder.encoder.layers.0")
    M[:, layer0] = 1
    M[4, layer0] = 0  # zeroing the first text layer's output erases every token's identity
    with torch.no_grad():
        batched = obj.values(plan, M)
        singles = torch.cat([obj.values(plan, M[i : i + 1]) for i in range(5)])
    assert batched.shape == (5, obj.n_samples)
    torch.testing.assert_close(batched, singles, rtol=1e-9, atol=0)
    torch.testing.assert_close(batched[0], obj.intact, rtol=1e-9, atol=0)
    assert len({tuple(np.round(r.numpy(), 12)) for r in batched}) == 5  # the masks differ in effect
    # known answer: without token identity, target and anchor prompts give the same context, so J = 0 exactly
    assert torch.equal(batched[4], torch.zeros_like(batched[4]))
    # chunking over rows (max_batch) gives the same values
    small = Objective(m, obj.concept, ObjectiveConfig(n_images=2, timesteps=(300, 700), max_batch=8, dtype="float64"))
    assert small.model is m  # already float64: no copy
    with torch.no_grad():
        torch.testing.assert_close(small.values(plan, M), batched, rtol=1e-9, atol=0)


# -- (c) patching ------------------------------------------------------------------------------------------------
def test_patching_every_transformer_block_makes_the_output_clean(tiny_world_model, tiny_red_objective):
    """Text reaches the UNet only through the transformer blocks' cross-attention: patching the clean output of every
    transformer block into a run with another text context reproduces the clean output exactly."""
    m = tiny_world_model
    x, t, ctx_clean, ctx_corr = inputs(tiny_red_objective)
    blocks = [c.module for c in m.components("layer", kind="transformer_block")]
    with torch.no_grad():
        clean, saved = run_unet(m, x, t, ctx_clean, saves=blocks)
        corrupted = plain_unet(m.unet, x, t, ctx_corr)
        assert set(saved) == set(blocks)
        assert not torch.equal(clean, corrupted)
        everywhere = torch.ones(1, 1, 1, dtype=torch.bool)
        patched, _ = run_unet(m, x, t, ctx_corr, patches={p: Patch(saved[p], everywhere) for p in blocks})
        assert torch.equal(patched, clean)
        # control: leaving out one block is not enough
        partial, _ = run_unet(m, x, t, ctx_corr, patches={p: Patch(saved[p], everywhere) for p in blocks[:-1]})
        assert not torch.allclose(partial, clean, rtol=0, atol=1e-7)
        # a module that is no component (the output norm) can be patched too, and determines the output
        _, s2 = run_unet(m, x, t, ctx_clean, saves=["unet.conv_norm_out"])
        out, _ = run_unet(m, x, t, ctx_corr, patches={"unet.conv_norm_out": Patch(s2["unet.conv_norm_out"], everywhere)})
        assert torch.equal(out, clean)
        # per-row patching: only the rows where ``where`` is true become clean
        rows = torch.tensor([True, False, True, False]).reshape(4, 1, 1, 1)
        mixed, _ = run_unet(m, x, t, ctx_corr, patches={"unet.conv_norm_out": Patch(s2["unet.conv_norm_out"], rows)})
        assert torch.equal(mixed[[0, 2]], clean[[0, 2]]) and torch.equal(mixed[[1, 3]], corrupted[[1, 3]])


def test_patching_the_last_text_layer_restores_the_text_states(tiny_world_model, tiny_red_objective):
    m, obj = tiny_world_model, tiny_red_objective
    last = "text_encoder.encoder.layers.2"
    with torch.no_grad():
        clean, saved = run_text(m, obj.target_ids, saves=[last])
        other = m.text_encoder(obj.anchor_ids)[0]
        assert not torch.equal(clean, other)
        patched, _ = run_text(m, obj.anchor_ids, patches={last: Patch(saved[last], torch.ones(1, 1, 1, dtype=torch.bool))})
    assert torch.equal(patched, clean)


# -- (d) gradients -----------------------------------------------------------------------------------------------
def _scale_hook(scale_fn):
    def hook(mod, args, out):
        return out * scale_fn(out)
    return hook


def test_multiplier_gradients_equal_autograd(tiny_world_model, tiny_red_objective):
    m = tiny_world_model
    x, t, ctx, _ = inputs(tiny_red_objective)
    units = [(f"{MID}.ff.net.0", [1, 4, 9]), (f"{RES}.conv1", [0, 5]), (f"{MID}.attn2.to_v", [2])]
    comps = [f"{p}[{j}]" for p, js in units for j in js] + ["unet.mid_block.resnets.1"]
    plan = compile_plan(m, comps)
    gen = torch.Generator().manual_seed(1)
    m0 = (0.5 + torch.rand(1, len(comps), generator=gen)).requires_grad_(True)
    eps, _ = run_unet(m, x, t, ctx, plan, m0)
    g_engine, = torch.autograd.grad(eps.pow(2).mean(), m0)
    # reference: plain forward hooks on a copy
    ref = copy.deepcopy(m.unet)
    mult = m0.detach().clone().requires_grad_(True)
    col = 0
    for path, js in units:
        mod = ref.get_submodule(rel(path))
        cols = list(range(col, col + len(js)))
        col += len(js)

        def scale(out, js=js, cols=cols, conv=isinstance(mod, torch.nn.Conv2d)):
            n = out.shape[1] if conv else out.shape[-1]
            s = torch.ones(n).index_put((torch.tensor(js),), mult[0, cols])
            return s.reshape(1, n, 1, 1) if conv else s
        mod.register_forward_hook(_scale_hook(scale))
    ref.get_submodule("mid_block.resnets.1").register_forward_hook(_scale_hook(lambda out: mult[0, col]))
    g_ref, = torch.autograd.grad(plain_unet(ref, x, t, ctx).pow(2).mean(), mult)
    assert g_engine.abs().min() > 0
    torch.testing.assert_close(g_engine, g_ref, rtol=1e-4, atol=1e-9)
    assert_frozen(m)
    assert_no_hooks(m)


def test_weight_gradients_equal_autograd(tiny_world_model, tiny_red_objective):
    m = tiny_world_model
    x, t, ctx, _ = inputs(tiny_red_objective)
    paths = [f"{MID}.ff.net.2", f"{RES}.conv1", "text_encoder.encoder.layers.2.mlp.fc1"]
    params = [m.module(p).weight for p in paths]
    plan = compile_plan(m, [f"{MID}.ff.net.0[3]", f"{TXT}.mlp.fc1[1]"])
    mult = torch.ones(1, 2)
    ids = tiny_red_objective.target_ids[tiny_red_objective.image_index]
    with parameters_requiring_grad(params):
        c, _ = run_text(m, ids, plan, mult)
        eps, _ = run_unet(m, x, t, c, plan, mult)
        grads = torch.autograd.grad(eps.pow(2).mean(), params)
    assert_frozen(m)
    ref_unet, ref_text = copy.deepcopy(m.unet), copy.deepcopy(m.text_encoder)
    ref_params = [ref_unet.get_submodule(rel(paths[0])).weight, ref_unet.get_submodule(rel(paths[1])).weight,
                  ref_text.get_submodule(rel(paths[2])).weight]
    for p in ref_params:
        p.requires_grad_(True)
    ref_grads = torch.autograd.grad(plain_unet(ref_unet, x, t, ref_text(ids)[0]).pow(2).mean(), ref_params)
    for g, r, p in zip(grads, ref_grads, paths):
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-9, msg=p)


# -- (e) weights and hooks untouched, also after errors ----------------------------------------------------------
def test_weights_bitwise_unchanged_after_interventions_and_errors(tiny_world_model, tiny_red_objective):
    m, obj = tiny_world_model, tiny_red_objective
    before = m.state_fingerprint()
    x, t, ctx, ctx2 = inputs(obj)
    plan = compile_plan(m, UNET_SET + [f"{TXT}.mlp.fc1[0]"])
    with torch.no_grad():
        base = plain_unet(m.unet, x, t, ctx)
        run_unet(m, x, t, ctx, plan, torch.zeros(2, len(UNET_SET) + 1))
        run_text(m, obj.target_ids, plan, torch.zeros(1, len(UNET_SET) + 1))
        _, saved = run_unet(m, x, t, ctx, saves=["unet.conv_norm_out"])
        run_unet(m, x, t, ctx2, patches={"unet.conv_norm_out": Patch(saved["unet.conv_norm_out"], torch.tensor(True))})
    assert_weights_equal(m, before)

    w = f"{MID}.ff.net.2.weight[1,2]"
    p = m.module(f"{MID}.ff.net.2").weight
    with weights_ablated(m, [w, f"{RES}.conv1.bias[3]"]):
        assert p[1, 2] == 0 and m.module(f"{RES}.conv1").bias[3] == 0
    assert_weights_equal(m, before)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with weights_ablated(m, [w], value=7.0):
            assert p[1, 2] == 7.0
            raise Boom
    assert_weights_equal(m, before)
    # a bad address midway through the list: the weights already set are restored
    with pytest.raises(ValueError, match="not a scalar weight"):
        with weights_ablated(m, [w, f"{MID}.ff.net.0[3]"]):
            pass
    assert_weights_equal(m, before)

    # a patch of the wrong shape fails inside the trace, naming the module and the shapes
    with pytest.raises(ValueError, match=r"the patch of unet.conv_norm_out does not fit its output: clean \(3, 5, 7\)"):
        with torch.no_grad():
            run_unet(m, x, t, ctx, plan, torch.zeros(1, len(UNET_SET) + 1),
                     patches={"unet.conv_norm_out": Patch(torch.zeros(3, 5, 7), torch.tensor(True))})
    # multiplier rows that do not divide the batch fail too
    with pytest.raises(ValueError, match="3 multiplier rows do not divide a batch of 4"):
        with torch.no_grad():
            run_unet(m, x, t, ctx, plan, torch.zeros(3, len(UNET_SET) + 1))
    # a failing backward pass with weights requiring grad
    with pytest.raises(Boom):
        with parameters_requiring_grad([p]):
            run_unet(m, x, t, ctx, plan, torch.ones(1, len(UNET_SET) + 1))[0].sum().backward()
            raise Boom
    assert_weights_equal(m, before)
    assert_no_hooks(m)
    assert_frozen(m)
    # the engine still works after the failures
    with torch.no_grad():
        again, _ = run_unet(m, x, t, ctx, plan, torch.ones(1, len(UNET_SET) + 1))
    torch.testing.assert_close(again, base, rtol=0, atol=1e-6)


def test_a_saved_module_that_is_also_ablated_records_what_flowed_downstream(tiny_world_model, tiny_red_objective):
    m = tiny_world_model
    x, t, ctx, _ = inputs(tiny_red_objective)
    path = f"{MID}.ff.net.2"
    plan = compile_plan(m, [f"{path}[0]", f"{path}[3]"])
    with torch.no_grad():
        _, clean = run_unet(m, x, t, ctx, saves=[path])
        _, saved = run_unet(m, x, t, ctx, plan, torch.zeros(1, 2), saves=[path])
    assert (saved[path][..., [0, 3]] == 0).all()
    assert torch.equal(saved[path][..., 1], clean[path][..., 1])


# -- (f) memory -------------------------------------------------------------------------------------------------
def _alive() -> dict[str, int]:
    """Live objects after a collection: tensors, nnsight's objects, and every object the collector tracks."""
    gc.collect()
    objects = gc.get_objects()
    counts = {"tensor": 0, "nnsight": 0, "all": len(objects)}
    for o in objects:
        cls = type(o)  # not isinstance: some module proxies warn when asked for their __class__
        if issubclass(cls, torch.Tensor):
            counts["tensor"] += 1
        elif isinstance(mod := cls.__dict__.get("__module__"), str) and mod.startswith("nnsight"):
            counts["nnsight"] += 1
    return counts


def test_traces_leave_nothing_alive(tiny_world_model, tiny_red_objective):
    """80 traces (an ablation plan, a saved output each) leave no tensor and no nnsight object behind: the counts of
    live objects after 20 and after 100 traces are equal (keeping one trace's saved outputs would add one tensor per
    trace). Counted, not measured through the process's RSS, which moves with the allocator's pools and whatever
    else runs on the machine; the RSS over many traces is benchmarks/bench_trace_memory.py's."""
    m = tiny_world_model
    x, t, ctx, _ = inputs(tiny_red_objective)
    x, t, ctx = x[:1], t[:1], ctx[:1]
    plan = compile_plan(m, [f"{MID}.ff.net.0[1]", f"{RES}.conv1[0]", f"{MID}.attn2[0]"])
    alive = {}
    for i in range(100):
        with torch.no_grad():
            eps, saved = run_unet(m, x, t, ctx, plan, torch.rand(1, 3), saves=[f"{MID}.ff.net.2"])
        if i + 1 in (20, 100):
            del eps, saved
            alive[i + 1] = _alive()
    assert alive[100]["tensor"] == alive[20]["tensor"] and alive[100]["nnsight"] == alive[20]["nnsight"], alive
    assert alive[100]["all"] - alive[20]["all"] < 40, alive  # less than one object per two traces (caches settle)


# -- (g) clear errors --------------------------------------------------------------------------------------------
def test_clear_errors(tiny_world_model, tiny_red_objective, tmp_path):
    m, obj = tiny_world_model, tiny_red_objective
    with pytest.raises(UnknownComponentError, match="Did you mean"):
        compile_plan(m, [f"{MID}.ff.net.3[0]"])
    with pytest.raises(UnknownComponentError, match=r"unknown component '.*\.fff'.*Did you mean"):
        interp.attribute("ablation", m, "red", [f"{MID}.fff"], objective=obj)
    with pytest.raises(interp.ModelLoadError, match="no-such-model"):
        interp.load_model("no-such-model")
    with pytest.raises(FileNotFoundError, match="missing"):
        interp.load_model("./missing/dir")
    with pytest.raises(interp.ModelLoadError, match="model_index.json"):
        interp.load_model(str(tmp_path))
    with pytest.raises(TypeError, match="load_model takes a name, a folder or a DiffusionPipeline, not int"):
        interp.load_model(42)
    with pytest.raises(ValueError, match="empty"):
        interp.generate(m, [], steps=1)
    with pytest.raises(ValueError, match="empty"):
        m.check_prompts([])
    with pytest.raises(OutOfVocabularyError, match="'zebra'"):
        interp.generate(m, ["a red zebra"], steps=1)
    with pytest.raises(KeyError, match="concept words"):
        Objective(m, "zebra", ObjectiveConfig(n_images=1, timesteps=(500,)))
    with pytest.raises(ValueError, match="multiplier"):
        obj.values(None, torch.ones(1, 3))
    plan = compile_plan(m, [f"{MID}.ff.net.0[1]"])
    with pytest.raises(ValueError, match="columns"):
        obj.values(plan, torch.ones(1, 3))
    with pytest.raises(ValueError, match="scalar weights"):
        compile_plan(m, [f"{MID}.ff.net.2.weight[0,0]"])
    with pytest.raises(KeyError, match="registered methods"):
        interp.attribute("nope", m, "red", [f"{MID}.ff.net.0[1]"], objective=obj)
    with pytest.raises(TypeError, match="options"):
        interp.attribute("coar", m, "red", [f"{MID}.ff.net.0[1]"], objective=obj, n_mask=10)
    with pytest.raises(ValueError, match="granularity"):
        interp.attribute("coar", m, "red", [f"{MID}.ff.net.2.weight[0,0]"], objective=obj)
    with pytest.raises(ValueError, match="unknown objective 'nope'; objectives are"):
        ObjectiveConfig(kind="nope")
    with pytest.raises(ValueError, match="classifier"):
        Objective(m, "red", ObjectiveConfig(kind="classifier", n_images=1, timesteps=(500,)))


def test_nan_weight_gives_a_non_finite_objective_error(tiny_world_model_factory):
    m = tiny_world_model_factory()
    with torch.no_grad():
        m.module("unet.mid_block.resnets.0.conv1").weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteObjectiveError, match="red"):
        Objective(m, "red", ObjectiveConfig(n_images=1, timesteps=(500,)))


def test_layer_and_its_units_in_one_set_is_refused_in_either_order(tiny_world_model):
    with pytest.raises(ValueError, match="both as a layer"):
        compile_plan(tiny_world_model, [f"{MID}.ff.net.0[3]", f"{MID}.ff.net.0"])  # this order raises
    with pytest.raises(ValueError, match="both as a layer"):
        compile_plan(tiny_world_model, [f"{MID}.ff.net.0", f"{MID}.ff.net.0[3]"])  # this one does not


# -- (h) a real Stable Diffusion pipeline (tiny, random) -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sd_folder(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("tiny_sd")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for suffix in ("", "</w>"):
        for ch in letters:
            vocab[ch + suffix] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=16)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(d / "sd")
    return d / "sd"


def test_stable_diffusion_pipeline(tiny_sd_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = interp.load_model(str(tiny_sd_folder))
    assert not m.is_concept_world and m.classifier is None and m.vae is not None
    assert type(m.unet).__name__ == "UNet2DConditionModel" and type(m.text_encoder).__name__ == "CLIPTextModel"
    assert set(m.space.families()) == {"attn1", "attn2", "block", "ff", "resnet", "text_attn", "text_layer", "text_mlp"}
    from diffusers.models.attention_processor import Attention

    attn = [a for a in m.unet.modules() if isinstance(a, Attention)]
    assert len(attn) == 8  # 4 transformer blocks (down, mid, 2 x up) x (attn1, attn2)
    assert m.space.count("head", model="unet") == sum(a.heads for a in attn)
    assert m.space.count("neuron", kind="mlp.fc1") == 2 * 37
    for g in ("layer", "neuron", "head"):
        for c in m.space.iter(g):
            assert str(m.space.parse(c.address)) == c.address
    before = m.state_fingerprint()
    comps = list(m.components("neuron", kind="ff.net.0").addresses[:6]) + \
        list(m.components("neuron", kind="mlp.fc1").addresses[:3]) + [m.components("head", family="attn2").addresses[0]]
    concept = interp.text_concept("a cat", n=2)
    cfg = ObjectiveConfig(n_images=2, timesteps=(300, 700), gen_steps=2)
    frames = {}
    for method in ("cad", "ablation"):
        df = interp.attribute(method, m, concept, comps, objective=cfg)
        validate(df)
        assert list(df["component"]) == comps and (df["method"] == method).all()
        assert (df["model"] == str(tiny_sd_folder)).all() and (df["concept"] == "a cat").all()
        assert np.isfinite(df["score"]).all() and (df["score"] != 0).any()
        frames[method] = df["score"].to_numpy()
    assert_weights_equal(m, before)
    assert_no_hooks(m)
    assert_frozen(m)
    # first-order and true single-unit effects agree on this model (small effects)
    assert np.corrcoef(frames["cad"], frames["ablation"])[0, 1] > 0.9
    # the image path: images decoded through the VAE
    img = interp.generate(m, ["a cat"], steps=2)
    assert img.shape == (1, 3, 16, 16) and float(img.min()) >= 0 and float(img.max()) <= 1


def test_model_dtype_and_device_follow_the_unet_and_walk_it_once(tiny_world_model_factory, monkeypatch):
    """diffusers' ``unet.dtype``/``unet.device`` walk every module (~2 ms each): the model asks them once, and again
    only when the UNet is cast or moved."""
    import diffusers.models.modeling_utils as mu

    model = tiny_world_model_factory()
    asked = {"dtype": 0, "device": 0}
    dtype_of, device_of = mu.get_parameter_dtype, mu.get_parameter_device

    def counted(kind, fn):
        def wrapper(module):
            asked[kind] += 1
            return fn(module)
        return wrapper

    monkeypatch.setattr(mu, "get_parameter_dtype", counted("dtype", dtype_of))
    monkeypatch.setattr(mu, "get_parameter_device", counted("device", device_of))
    for dtype, n in ((torch.float64, 1), (torch.float32, 2)):
        torch.nn.Module.to(model.unet, dtype)
        for _ in range(20):
            assert model.dtype == dtype and model.device == torch.device("cpu")
        assert asked == {"dtype": n, "device": n}
