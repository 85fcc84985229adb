"""J, the forward noising and the denoising target against the papers' definitions, written out here in plain torch.

Everything below is computed without :mod:`interp.core.objectives`' or :mod:`interp.core.diffusion`'s formulas: the
model's own UNet, text encoder and VAE called directly, the scheduler's ``alphas_cumprod`` (itself checked against the
betas'
definitions), the noising of DDPM (Ho et al. 2020) ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``, the v target of
progressive distillation (Salimans & Ho 2022) ``v = sqrt(a_t) eps - sqrt(1 - a_t) x_0``, CAD's objectives (Nguyen et
al. 2024: erase ``mean (eps(x_t, c) - eps(x_t, c_anchor))^2``, amplify ``-mean (eps(x_t, c) - target)^2``, means over
pixels) and, for the classifier objective, a classifier-free guided sampling loop of the scheduler's own steps. Only
the evaluation set's random draws (the noise, and on Stable Diffusion the generated images, recovered from x_t) are
read from the objective. The models are tiny: Stable Diffusion 1.x style (epsilon, PNDM), 2.x style (v-prediction,
DDIM), the shipped concept world (v-prediction, a cosine schedule, pixel space, its trained classifier) and SD3 (flow
matching: ``x_t = (1 - sigma) x_0 + sigma eps``, target ``eps - x_0``, its own pipeline's conditioning).

Second part: known answers of the estimators beyond first order (integrated gradients, the midpoint gradient,
screen-then-verify) on an objective whose multiplier dependence is an exact polynomial, and CAD's aggregation of
``w * dJ/dw`` to heads, Linear rows with their bias and whole layers against plain autograd of the J above.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import MID, ProductFF

import interp
from interp.core import diffusion
from interp.core.concepts import Concept
from interp.core.interventions import compile_plan
from interp.core.objectives import Objective, ObjectiveConfig
from interp.testing import make_scheduler, tiny_stable_diffusion

pytestmark = pytest.mark.xdist_group("known_answers")

CONCEPT = Concept("red", ("a photo of a red cat", "a red dog"), ("a photo of a cat", "a dog"),
                  alternatives=("blue", "green"))
TIMESTEPS = (100, 600)


# -- the definitions ----------------------------------------------------------------------------------------------
def papers_alphas_cumprod(config) -> torch.Tensor:
    """``prod_s (1 - beta_s)`` for the betas a scheduler config names: linear and scaled-linear (DDPM, Stable
    Diffusion), and the cosine schedule of Nichol & Dhariwal 2021 with betas capped at 0.999."""
    n, b0, b1 = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    kind = config["beta_schedule"]
    if kind == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        f = lambda t: math.cos((t / n + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(n)], dtype=torch.float64)
    else:
        raise AssertionError(f"no definition written here for {kind!r}")
    return torch.cumprod(1 - betas, 0)


def alpha_bar(scheduler, t: torch.Tensor) -> torch.Tensor:
    """The scheduler's own ``alphas_cumprod`` at ``t``, shaped to broadcast over images."""
    return scheduler.alphas_cumprod.to(torch.float64)[t.cpu()].reshape(-1, 1, 1, 1)


def noised(scheduler, x0, eps, t):
    a = alpha_bar(scheduler, t)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def velocity(scheduler, x0, eps, t):
    a = alpha_bar(scheduler, t)
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def text_states(model, prompts) -> torch.Tensor:
    """Stable Diffusion's text conditioning: the prompts padded to the tokenizer's full length, the text encoder's
    last hidden states."""
    tok = model.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return model.text_encoder(ids)[0]


def prediction(model, x, t, ctx) -> torch.Tensor:
    return model.unet(x, t, encoder_hidden_states=ctx).sample.double()


def recovered_images(obj) -> torch.Tensor:
    """x_0 of each evaluation sample solved from its x_t and noise by the noising formula: the samples of one image at
    different timesteps (with different noise) agree only if x_t was built by that formula."""
    sched = obj.model.scheduler
    a = alpha_bar(sched, obj.t)
    x0 = (obj.x_t.double() - (1 - a).sqrt() * obj.noise.double()) / a.sqrt()
    n_t = len(obj.config.timesteps)
    per_image = x0.reshape(obj.config.n_images, n_t, *x0.shape[1:])
    for k in range(1, n_t):
        torch.testing.assert_close(per_image[:, k], per_image[:, 0], rtol=1e-6, atol=1e-6)
    return x0


def plain_objective(obj, hooks=(), frozen_anchor_hooks=False, target=None):
    """J per sample from the definitions: the model's forward passes with ``hooks`` (``(module, fn)`` forward hooks:
    an ablation written in plain torch) on both branches, or on the target branch only when the anchor is frozen."""
    model, cfg = obj.model, obj.config
    idx = obj.image_index
    handles = [mod.register_forward_hook(fn) for mod, fn in hooks]
    try:
        eps_c = prediction(model, obj.x_t, obj.t, text_states(model, obj.target_prompts)[idx])
        if cfg.kind == "erase" and not (cfg.anchor == "frozen" and frozen_anchor_hooks):
            eps_a = prediction(model, obj.x_t, obj.t, text_states(model, obj.anchor_prompts)[idx])
    finally:
        for h in handles:
            h.remove()
    if cfg.kind == "erase":
        if cfg.anchor == "frozen" and frozen_anchor_hooks:  # the intact model's anchor prediction
            eps_a = prediction(model, obj.x_t, obj.t, text_states(model, obj.anchor_prompts)[idx])
        return ((eps_c - eps_a) ** 2).mean(dim=(1, 2, 3))
    return -((eps_c - target) ** 2).mean(dim=(1, 2, 3))


def zero_unit(j: int, axis: int = -1):
    """A forward hook that zeroes output unit ``j`` (a Linear feature, or a conv channel with ``axis=1``)."""

    def hook(mod, args, out):
        out = out.clone()
        out.select(axis, j).zero_()
        return out

    return hook


# -- the training schedule and the forward process --------------------------------------------------------------
STYLES = {"sd1": "epsilon", "sd2": "v_prediction"}


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                                       "DPMSolverMultistepScheduler"])
def test_forward_noising_and_target_follow_the_definitions(style, scheduler):
    """Whatever sampler a pipeline ships (the sigma-based Euler and DPM-Solver included), x_t and the target are the
    training process's: DDPM's noising and, by prediction type, the noise or the velocity."""
    sched = make_scheduler(scheduler, style)
    assert diffusion.prediction_type(sched) == STYLES[style]
    torch.testing.assert_close(sched.alphas_cumprod.double(), papers_alphas_cumprod(sched.config), rtol=1e-5,
                               atol=0)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64)
    eps = torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(diffusion.add_noise(sched, x0, eps, t), noised(sched, x0, eps, t), rtol=1e-12, atol=1e-12)
    want = eps if style == "sd1" else velocity(sched, x0, eps, t)
    torch.testing.assert_close(diffusion.denoising_target(sched, x0, eps, t), want, rtol=1e-12, atol=1e-12)


def test_sample_prediction_target_is_the_image():
    sched = make_scheduler("DDIMScheduler", "sd1")
    sched = sched.__class__.from_config({**sched.config, "prediction_type": "sample"})
    x0, eps = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    assert torch.equal(diffusion.denoising_target(sched, x0, eps, torch.tensor([3, 700])), x0)


def test_the_concept_worlds_cosine_schedule_is_the_papers():
    sched = interp.load_model("concept-world", device="cpu").scheduler
    assert sched.config["beta_schedule"] == "squaredcos_cap_v2"
    torch.testing.assert_close(sched.alphas_cumprod.double(), papers_alphas_cumprod(sched.config), rtol=1e-5, atol=1e-7)


# -- J from the definitions -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def known_sd_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("known-sd")
    return {style: tiny_stable_diffusion(root / style, style=style) for style in STYLES}


@pytest.fixture(scope="module")
def known_models(known_sd_folders):
    """The models the J-from-the-definitions tests read, cast once to float64, their objectives' dtype (an objective
    on a float32 model makes a float64 copy of its own, its FLOPs counted again, about a second each time). Read
    only: tests that enable gradients or hooks on them remove them again."""
    from conftest import float64_copy

    models = {style: interp.load_model(str(folder), device="cpu") for style, folder in known_sd_folders.items()}
    models["world"] = interp.load_model("concept-world", device="cpu")
    return {name: float64_copy(model) for name, model in models.items()}


def _objective(models, which, kind, anchor="shared", **cfg):
    concept = "red" if which == "world" else CONCEPT
    config = ObjectiveConfig(kind=kind, anchor=anchor, n_images=2, timesteps=TIMESTEPS, dtype="float64", gen_steps=2,
                             **cfg)
    return Objective(models[which], concept, config)


#: A unit of the UNet (a feed-forward output feature) and one of the text encoder, ablated together.
ABLATED = ((f"{MID}.ff.net.2", 5), ("text_encoder.encoder.layers.1.mlp.fc1", 4))


def _ablation(obj):
    """The same two-unit ablation as a compiled plan with multipliers 0, and as plain forward hooks."""
    plan = compile_plan(obj.model, [f"{p}[{j}]" for p, j in ABLATED])
    hooks = [(obj.model.module(p), zero_unit(j)) for p, j in ABLATED]
    return plan, torch.zeros(1, len(ABLATED), dtype=torch.float64), hooks


@pytest.mark.parametrize("which", ["sd1", "sd2", "world"])
def test_erase_objective_is_the_squared_difference_of_the_two_predictions(which, known_models):
    obj = _objective(known_models, which, "erase")
    recovered_images(obj)
    with torch.no_grad():
        want = plain_objective(obj)
    assert (want > 0).all()
    torch.testing.assert_close(obj.values()[0], want, rtol=1e-9, atol=0)
    torch.testing.assert_close(obj.intact, want, rtol=1e-9, atol=0)
    # both anchors: an ablation of a UNet unit and a text-encoder unit, on both branches (shared) or on the target
    # branch only, the anchor's prediction the intact model's (frozen)
    plan, zeros, hooks = _ablation(obj)
    with torch.no_grad():
        shared = plain_objective(obj, hooks)
        torch.testing.assert_close(obj.values(plan, zeros)[0], shared, rtol=1e-9, atol=0)
        frozen_obj = _objective(known_models, which, "erase", anchor="frozen")
        torch.testing.assert_close(frozen_obj.intact, want, rtol=1e-9, atol=0)
        plan, zeros, hooks = _ablation(frozen_obj)  # on the frozen objective's own model
        frozen = plain_objective(frozen_obj, hooks, frozen_anchor_hooks=True)
        torch.testing.assert_close(frozen_obj.values(plan, zeros)[0], frozen, rtol=1e-9, atol=0)
    assert not torch.allclose(shared, frozen, rtol=1e-6)  # the two anchors are different objectives


@pytest.mark.parametrize("which", ["sd1", "sd2", "world"])
def test_amplify_objective_is_minus_the_denoising_loss_on_the_target(which, known_models):
    obj = _objective(known_models, which, "amplify")
    x0 = recovered_images(obj)
    if which == "world":  # the concept world's images are the renders of the scenes the prompts describe
        renders = obj.model.world.evaluation_images(obj.concept, obj.config.n_images, "cpu", torch.float64)
        torch.testing.assert_close(x0, renders[obj.image_index], rtol=1e-6, atol=1e-6)
    sched, noise = obj.model.scheduler, obj.noise.double()
    kind = sched.config["prediction_type"]
    assert kind == ("epsilon" if which == "sd1" else "v_prediction")
    target = noise if kind == "epsilon" else velocity(sched, x0, noise, obj.t)
    plan, zeros, hooks = _ablation(obj)
    with torch.no_grad():
        want = plain_objective(obj, target=target)
        ablated = plain_objective(obj, hooks, target=target)
        got_ablated = obj.values(plan, zeros)[0]
    assert (want < 0).all()
    torch.testing.assert_close(obj.intact, want, rtol=1e-9, atol=0)
    torch.testing.assert_close(got_ablated, ablated, rtol=1e-9, atol=0)


def _sample(model, prompts, steps, guidance, seed):
    """Classifier-free guided sampling from the definitions: the scheduler's own steps from seeded unit noise, the
    guided prediction ``eps_u + g (eps_c - eps_u)``, then the VAE (or the pixels themselves) to images in [0, 1]."""
    sched = model.scheduler.__class__.from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    n = len(prompts)
    shape = (n, model.unet.config.in_channels, model.unet.config.sample_size, model.unet.config.sample_size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).double() * sched.init_noise_sigma
    cond, uncond = text_states(model, prompts), text_states(model, [""] * n)
    for t in sched.timesteps:
        if guidance == 1:
            eps = prediction(model, sched.scale_model_input(latents, t), t, cond)
        else:
            x = sched.scale_model_input(torch.cat([latents, latents]), t)
            eps_c, eps_u = prediction(model, x, t, torch.cat([cond, uncond])).chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        latents = sched.step(eps, t, latents).prev_sample
    if model.vae is not None:
        latents = model.vae.decode(latents / model.vae.config.scaling_factor).sample
    return (latents / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("which,guidance", [("world", None), ("world", 3.0), ("sd2", None)])
def test_classifier_objective_is_the_judges_probability_on_images_sampled_from_the_definitions(which, guidance,
                                                                                             known_models):
    judge = {} if which == "world" else {"judge": "concept-world-clip"}
    obj = _objective(known_models, which, "classifier", guidance=guidance, **judge)
    g = obj.model.default_guidance if guidance is None else guidance
    assert g != 1 or which == "world"  # the world samples unguided by default; Stable Diffusion at 7.5
    with torch.no_grad():
        images = _sample(obj.model, obj.target_prompts, obj.config.gen_steps, g, obj.config.seed)
        want = obj.judge.probability(images, obj.concept).double()
    # images reach a judge in float32 (and a CLIP judge scores in float32) whatever the objective's dtype: rounding
    # of a few float32 ulps
    torch.testing.assert_close(obj.intact.double(), want, rtol=1e-5, atol=0)


# -- flow matching (SD3, FLUX) --------------------------------------------------------------------------------------
def test_flow_matching_noising_and_target_follow_the_definitions():
    """Rectified flow (Liu et al. 2022; SD3, Esser et al. 2024): ``x_t = (1 - sigma) x_0 + sigma eps`` and the velocity
    target ``eps - x_0``, at ``sigma = t / 1000`` for the timestep ``t`` the transformer is told: the relation of the
    scheduler's own training table (its timesteps are its sigmas times 1000, whatever its shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    torch.testing.assert_close(sched.timesteps.double(), sched.sigmas[: len(sched.timesteps)].double() * 1000,
                               rtol=1e-6, atol=1e-4)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 16, 8, 8, generator=gen, dtype=torch.float64)
    eps = torch.randn(4, 16, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 999])
    sigma = (t.double() / 1000).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion.add_noise(sched, x0, eps, t), (1 - sigma) * x0 + sigma * eps, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(diffusion.denoising_target(sched, x0, eps, t), eps - x0, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def known_sd3(tiny_family_folders):
    return tiny_family_folders["sd3"]


@pytest.mark.parametrize("kind", ["erase", "amplify"])
def test_flow_matching_objectives_are_the_definitions(kind, known_sd3):
    """J on a tiny SD3 from its own diffusers pipeline, loaded apart in float64: the pipeline's ``encode_prompt`` (the
    CLIP and T5 states and the pooled vector), the transformer told ``t``, the objective's x_t solved for x_0 by the
    flow-matching noising (consistent across an image's timesteps), the velocity target ``eps - x_0``."""
    from diffusers import StableDiffusion3Pipeline

    obj = Objective(interp.load_model(str(known_sd3), device="cpu"), CONCEPT,
                    ObjectiveConfig(kind=kind, n_images=2, timesteps=TIMESTEPS, dtype="float64", gen_steps=2))
    pipe = StableDiffusion3Pipeline.from_pretrained(known_sd3, dtype=torch.float64)
    sigma = (obj.t.double() / 1000).reshape(-1, 1, 1, 1)
    x0 = (obj.x_t - sigma * obj.noise) / (1 - sigma)
    per_image = x0.reshape(obj.config.n_images, len(TIMESTEPS), *x0.shape[1:])
    torch.testing.assert_close(per_image[:, 1], per_image[:, 0], rtol=1e-9, atol=1e-9)
    idx = obj.image_index

    def velocity_prediction(prompts):
        states, _, pooled, _ = pipe.encode_prompt(list(prompts), list(prompts), list(prompts),
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=pipe.tokenizer_3.model_max_length)
        return pipe.transformer(hidden_states=obj.x_t, timestep=obj.t, encoder_hidden_states=states[idx],
                                pooled_projections=pooled[idx]).sample

    with torch.no_grad():
        v = velocity_prediction(obj.target_prompts)
        if kind == "erase":
            want = ((v - velocity_prediction(obj.anchor_prompts)) ** 2).mean(dim=(1, 2, 3))
        else:
            want = -((v - (obj.noise - x0)) ** 2).mean(dim=(1, 2, 3))
    assert (want != 0).all()
    torch.testing.assert_close(obj.intact, want, rtol=1e-9, atol=0)


# -- estimators beyond first order: an objective that is an exact polynomial of the multipliers -----------------------
@pytest.fixture(scope="module")
def known_poly(tiny_world_model):
    """``J = 1e3 * L1 L2 L3`` (:class:`helpers.ProductFF`), ``L_i = c_i + sum_j g_ij m_j`` exactly linear in the
    multipliers of six GEGLU units, on one evaluation sample; the coefficients measured by single ablations of the
    readouts. Returns the objective, the components and a function giving J's gradient at any multipliers."""
    gen = torch.Generator().manual_seed(11)
    out = tiny_world_model.module(f"{MID}.ff.net.2").out_features
    vs = [torch.randn(out, generator=gen) for _ in range(3)]
    cfg = ObjectiveConfig(kind="amplify", n_images=1, timesteps=(300,), dtype="float64")
    obj = ProductFF(tiny_world_model, "red", cfg, MID, *vs)
    comps = interp.ComponentSet(list(obj.model.components("neuron", kind="ff.net.0", layer="mid.a0.tb0"))[:6])
    plan = compile_plan(obj.model, comps)
    n = len(comps)
    M = torch.ones(n + 1, n, dtype=torch.float64)
    M[torch.arange(1, n + 1), torch.arange(n)] = 0
    L = obj.readouts(plan, M)  # (3 readouts, n + 1 rows)
    g = L[:, :1] - L[:, 1:]  # (3, n): ablating unit j removes g_ij from readout i
    c = L[:, 0] - g.sum(1)

    def readouts(m):  # L_i at multipliers m (n,)
        return c + g @ m

    def grad(m):  # dJ/dm_a = 1e3 sum_i g_ia prod_{l != i} L_l(m)
        Lm = readouts(m)
        return 1e3 * sum(g[i] * torch.prod(torch.cat([Lm[:i], Lm[i + 1:]])) for i in range(3))

    def value(m):
        return 1e3 * torch.prod(readouts(m))

    # the polynomial is J: at random multipliers the objective's own values agree
    R = torch.rand(3, n, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(obj.values(plan, R)[:, 0], torch.stack([value(r) for r in R]), rtol=1e-9, atol=0)
    return obj, comps, grad, value


def _run(method, obj, comps, **kw):
    return interp.attribute(method, obj.model, obj.concept, comps, objective=obj, **kw)["score"].to_numpy()


@pytest.mark.parametrize("steps", [1, 3, 4])
def test_integrated_gradients_is_the_midpoint_riemann_sum_along_the_path(steps, known_poly):
    """IG with K steps and path end p: ``(1 - p) / K * sum_k dJ/dm`` at multipliers ``1 - (k + 1/2)(1 - p) / K``. The
    gradient is quadratic along the path, so the K points are pinned: other points (K + 1 of them, the ends of the
    steps) give other sums."""
    obj, comps, grad, _ = known_poly
    n = len(comps)
    for path_end in (0.0, 0.5):
        levels = [1 - (k + 0.5) * (1 - path_end) / steps for k in range(steps)]
        want = (1 - path_end) / steps * sum(grad(torch.full((n,), lv, dtype=torch.float64)) for lv in levels)
        got = _run("ig", obj, comps, steps=steps, path_end=path_end, batch=2)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-7, atol=0)
        ends = [1 - (k + 1) * (1 - path_end) / steps for k in range(steps)]
        other = (1 - path_end) / steps * sum(grad(torch.full((n,), lv, dtype=torch.float64)) for lv in ends)
        assert not np.allclose(got, other.numpy(), rtol=1e-3)


def test_integrated_gradients_is_complete(known_poly):
    """Completeness (Sundararajan et al. 2017): the scores sum to ``J(1) - J(path end)``; with a cubic J the midpoint
    rule's error is ``(1 - p)^3 f'' / (24 K^2)`` for the path's second derivative f'' of dJ/dlevel, which bounds it."""
    obj, comps, grad, value = known_poly
    n = len(comps)
    ones = torch.ones(n, dtype=torch.float64)
    for steps in (2, 16):
        got = _run("ig", obj, comps, steps=steps, batch=8).sum()
        exact = float(value(ones) - value(0 * ones))
        # the path's J(l) = value(l * 1) is a cubic in l: J''' is constant, so dJ/dl's second derivative is 6 a3
        coef = np.polyfit([0, 1 / 3, 2 / 3, 1], [float(value(lv * ones)) for lv in (0, 1 / 3, 2 / 3, 1)], 3)
        bound = abs(6 * coef[0]) / (24 * steps**2)
        assert abs(got - exact) <= bound * (1 + 1e-6) + 1e-9 * abs(exact)
        assert abs(got - exact) >= bound * (1 - 1e-6)  # the midpoint rule's error is exactly that for a cubic
    with torch.no_grad():  # and the end points are the objective's own
        plan = compile_plan(obj.model, comps)
        ends = obj.values(plan, torch.stack([ones, 0 * ones]))[:, 0]
    assert float(ends[0] - ends[1]) == pytest.approx(exact, rel=1e-9)


def test_midpoint_is_the_gradient_at_half_the_ablation_rate(known_poly):
    obj, comps, grad, _ = known_poly
    n = len(comps)
    for alpha in (0.05, 0.6):
        got = _run("midpoint", obj, comps, alpha=alpha)
        want = grad(torch.full((n,), 1 - alpha / 2, dtype=torch.float64))
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-7, atol=0)
        assert not np.allclose(got, grad(torch.full((n,), 1 - alpha, dtype=torch.float64)).numpy(), rtol=1e-3)


@pytest.mark.parametrize("by", ["abs", "positive", "negative"])
def test_screen_verifies_exactly_its_top_fraction(by, known_poly):
    """Screen-then-verify with CAD as the screener: the top ``round(fraction * n)`` components by the rule ``by`` carry
    their exact single-ablation effect ``J(1) - J(unit a ablated)``, every other one CAD's gradient at 1."""
    obj, comps, grad, value = known_poly
    n = len(comps)
    ones = torch.ones(n, dtype=torch.float64)
    cad = grad(ones).numpy()
    effect = np.array([float(value(ones) - value(ones - torch.eye(n, dtype=torch.float64)[a])) for a in range(n)])
    assert not np.allclose(cad, effect, rtol=1e-3)  # J is not linear: the verified scores differ from the screen
    for fraction in (0.34, 0.5):
        df = interp.attribute("screen", obj.model, obj.concept, comps, objective=obj, screen="cad", fraction=fraction,
                              by=by)
        k = int(round(fraction * n))
        key = {"abs": np.abs(cad), "positive": cad, "negative": -cad}[by]
        top = set(np.argsort(-key, kind="stable")[:k].tolist())
        assert df.attrs["meta"]["verified"] == [comps[i].address for i in np.argsort(-key, kind="stable")[:k]]
        want = np.array([effect[i] if i in top else cad[i] for i in range(n)])
        np.testing.assert_allclose(df["score"].to_numpy(), want, rtol=1e-7, atol=0)
        stderr = df["stderr"].to_numpy()
        assert np.isnan(stderr[[i for i in range(n) if i not in top]]).all()


# -- CAD's aggregation against plain autograd -----------------------------------------------------------------------
AGGREGATES = [
    # (component, the weights ablating it zeroes: (parameter path, index) pairs)
    (f"{MID}.attn2[1]", None),  # a head: its columns of the output projection (_head_slices)
    (f"{MID}.attn1.to_out.0[2]", [(f"{MID}.attn1.to_out.0.weight", 2), (f"{MID}.attn1.to_out.0.bias", 2)]),
    (f"{MID}.ff.net.2[5]", [(f"{MID}.ff.net.2.weight", 5), (f"{MID}.ff.net.2.bias", 5)]),
    (f"{MID}.attn2.to_k", [(f"{MID}.attn2.to_k.weight", slice(None))]),
    (f"{MID}.ff", [(f"{MID}.ff.net.2.weight", slice(None)), (f"{MID}.ff.net.2.bias", slice(None))]),
    (f"{MID}.attn1", [(f"{MID}.attn1.to_out.0.weight", slice(None)), (f"{MID}.attn1.to_out.0.bias", slice(None))]),
    ("text_encoder.encoder.layers.1.self_attn[0]", None),
    ("text_encoder.encoder.layers.1.mlp.fc2[3]", [("text_encoder.encoder.layers.1.mlp.fc2.weight", 3),
                                                 ("text_encoder.encoder.layers.1.mlp.fc2.bias", 3)]),
    ("text_encoder.encoder.layers.1.mlp.fc2", [("text_encoder.encoder.layers.1.mlp.fc2.weight", slice(None)),
                                              ("text_encoder.encoder.layers.1.mlp.fc2.bias", slice(None))]),
]


def _head_slices(model, address):
    """A head's weights: the columns of its attention's output projection that read that head's features (no bias:
    the bias is shared by every head, and ablating one head leaves it)."""
    comp = model.space.parse(address)
    mod = model.module(comp.module)
    proj, name = (mod.to_out[0], "to_out.0") if hasattr(mod, "to_out") else (mod.out_proj, "out_proj")
    d = proj.in_features // mod.heads if hasattr(mod, "heads") else mod.head_dim  # diffusers' / CLIP's attention
    return [(f"{comp.module}.{name}.weight", (slice(None), slice(comp.index * d, (comp.index + 1) * d)))]


def test_cad_aggregates_w_times_dj_dw_over_exactly_the_ablated_weights(known_models):
    """A component's CAD score is ``sum w * dJ/dw`` over the weights ablating it zeroes: a head's columns of its
    output projection, a Linear row and its bias, every weight (and bias) of a layer's output projection. The
    gradients here are plain autograd of the J written out above, on the shipped concept world in float64."""
    obj = _objective(known_models, "world", "erase")
    model = obj.model
    named = dict(model.parameters())
    slices = {a: _head_slices(model, a) if s is None else s for a, s in AGGREGATES}
    used = sorted({p for s in slices.values() for p, _ in s})
    params = [named[p] for p in used]
    for p in params:
        p.requires_grad_(True)
    try:
        J = plain_objective(obj).mean()
        grads = dict(zip(used, torch.autograd.grad(J, params)))
    finally:
        for p in params:
            p.requires_grad_(False)
    want = np.array([float(sum((named[p].detach()[i] * grads[p][i]).sum() for p, i in slices[a])) for a, _ in AGGREGATES])
    assert (want != 0).all()
    got = _run("cad", obj, [a for a, _ in AGGREGATES], n_groups=1)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=0)
    # the biases matter: a Linear row's score without its bias, or a head's with the shared bias, is another number
    for a, s in slices.items():
        biases = [(p, i) for p, i in s if p.endswith(".bias")]
        if biases:
            without = float(sum((named[p].detach()[i] * grads[p][i]).sum() for p, i in s if not p.endswith(".bias")))
            assert not np.isclose(got[[x for x, _ in AGGREGATES].index(a)], without, rtol=1e-6), a
