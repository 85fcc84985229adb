"""Learned features as components (issue 40): SAE training, attaching, the feature intervention and every
activation-based method on features, on the tiny concept world."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import values_with_hook

import interp

SITE = "unet.mid_block.attentions.0.transformer_blocks.0.ff"  # (B, tokens, 16) on the tiny world
STAGE = "unet.mid_block.attentions.0"  # a Transformer2DModel: channel-first (B, 16, 4, 4)
FEATURE_METHODS = ("ablation", "cad", "coar", "maskgrad", "ig", "midpoint", "screen")


@pytest.fixture(scope="module")
def acts(tiny_world_model):
    from interp.core.features import collect_activations

    return collect_activations(tiny_world_model, SITE, ["a red circle", "a blue square"], seeds=(0, 1), steps=3)


@pytest.fixture(scope="module")
def sae(acts):
    from interp.core.features import train_sae

    return train_sae(acts, k=4, expansion=4, steps=60, batch=64, site=SITE)


@pytest.fixture
def world(tiny_world_model, sae):
    """The shared tiny model with ``sae`` attached at SITE, detached again afterwards."""
    from interp.core.features import attach, detach

    attach(tiny_world_model, sae)
    yield tiny_world_model
    detach(tiny_world_model, SITE)


def _eps(model, obj, plan=None, mult=None, means=None):
    from interp.core.interventions import run_unet

    x, t = obj.x_t, obj.t
    ctx = obj.ctx_target[obj.image_index]
    with torch.no_grad():
        return run_unet(model, x, t, ctx, plan, mult, means)[0]


def _planted_sae(model, site, d, n=None, k=None, seed=0):
    """An SAE whose features are exact: orthonormal directions (a random rotation's rows)."""
    from interp.core.features import planted

    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return planted(site, q[: n or d], k=k)


def test_collect_gives_token_rows_over_trajectories(tiny_world_model, acts):
    # 2 prompts x 2 seeds x 3 steps, unguided (one branch), 4x4 = 16 tokens each, width 16
    assert acts.shape == (2 * 2 * 3 * 16, 16) and acts.dtype == torch.float32
    from interp.core.features import collect_activations

    rows = collect_activations(tiny_world_model, STAGE, ["a red circle"], seeds=(0,), steps=2)
    assert rows.shape == (2 * 16, 16)  # channel-first: spatial positions are rows, channels their width
    guided = collect_activations(tiny_world_model, SITE, ["a red circle"], seeds=(0,), steps=2, guidance=3.0)
    assert guided.shape == (2 * 2 * 16, 16)  # both guidance branches


def test_training_is_deterministic_and_records_its_data(acts, sae):
    from interp.core.features import data_hash, train_sae

    again = train_sae(acts, k=4, expansion=4, steps=60, batch=64, site=SITE)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, name), getattr(again, name)), name
    assert sae.data_hash == data_hash(acts) and len(sae.data_hash) == 64
    assert sae.n_features == 64 and sae.d_in == 16 and sae.k == 4
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))  # unit-norm decoder rows
    q = sae.quality
    assert 0 < q["fvu"] < 1 and 0 < q["l0"] <= 4 and 0 <= q["dead"] < 64 and 0 <= q["dense"] <= 64
    other = train_sae(acts, k=4, expansion=4, steps=60, batch=64, site=SITE, seed=1)
    assert not torch.equal(other.W_enc, sae.W_enc)


def test_encoding_equals_sparsify(acts, sae):
    from interp.core.features import _quiet

    with _quiet():
        from sparsify import SparseCoder, SparseCoderConfig
    coder = SparseCoder(16, SparseCoderConfig(k=4, num_latents=64))
    with torch.no_grad():
        coder.encoder.weight.copy_(sae.W_enc)
        coder.encoder.bias.copy_(sae.b_enc)
        coder.W_dec.copy_(sae.W_dec)
        coder.b_dec.copy_(sae.b_dec)
        a, i, _ = coder.encode(acts)
        dense = torch.zeros(len(acts), 64).scatter(1, i, a)
        torch.testing.assert_close(sae.dense(acts), dense, rtol=0, atol=0)
        torch.testing.assert_close(sae.reconstruct(acts), coder.decode(a, i), rtol=1e-6, atol=1e-6)


def test_training_resumes_to_the_same_sae(acts, tmp_path):
    from interp.core.features import train_sae

    whole = train_sae(acts, k=4, expansion=4, steps=30, batch=64, site=SITE)
    ckpt = tmp_path / "ckpt.pt"
    train_sae(acts, k=4, expansion=4, steps=30, batch=64, site=SITE, checkpoint=ckpt, checkpoint_every=10)
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 30
    # an interrupted run: keep the checkpoint of step 10, then run again
    part = tmp_path / "part.pt"
    with pytest.raises(KeyboardInterrupt):
        _interrupted(acts, part)
    assert torch.load(part, weights_only=True)["step"] == 10
    resumed = train_sae(acts, k=4, expansion=4, steps=30, batch=64, site=SITE, checkpoint=part, checkpoint_every=10)
    assert torch.equal(resumed.W_enc, whole.W_enc) and torch.equal(resumed.W_dec, whole.W_dec)
    with pytest.raises(ValueError, match="other data or arguments"):
        train_sae(acts, k=2, expansion=4, steps=30, batch=64, site=SITE, checkpoint=part)


def _interrupted(acts, ckpt):
    """train_sae stopped by a KeyboardInterrupt after step 15 (its checkpoint at step 10 written)."""
    import interp.core.features as F

    real = F._batch
    calls = {"n": 0}

    def batch(*a):
        calls["n"] += 1
        if calls["n"] > 15:
            raise KeyboardInterrupt
        return real(*a)

    F._batch = batch
    try:
        F.train_sae(acts, k=4, expansion=4, steps=30, batch=64, site=SITE, checkpoint=ckpt, checkpoint_every=10)
    finally:
        F._batch = real


def test_save_and_load_round_trip(sae, tmp_path):
    from interp.core.features import _quiet, load_sae, save_sae

    save_sae(sae, tmp_path / "s")
    back = load_sae(tmp_path / "s")
    assert back.site == SITE and back.k == sae.k and back.digest() == sae.digest()
    assert back.quality == sae.quality and back.data_hash == sae.data_hash
    with _quiet():
        from sparsify import SparseCoder
    coder = SparseCoder.load_from_disk(tmp_path / "s")  # sparsify reads the same folder
    assert torch.equal(coder.W_dec, sae.W_dec) and coder.cfg.k == sae.k
    with pytest.raises(ValueError, match="no sae.safetensors"):
        load_sae(tmp_path)


def test_addresses_and_selection(world, sae):
    c = world.space.parse(f"{SITE}#f12")
    assert str(c) == f"{SITE}#f12" and c.granularity == "feature" and c.index == 12 and c.module == SITE
    assert c.family == "ff" and c.block == "mid_block"
    comps = world.components("feature")
    assert len(comps) == 64 and comps[0].address == f"{SITE}#f0"
    assert len(world.components("feature", family="ff", block="mid_block")) == 64
    frame = comps.frame()
    assert set(frame.granularity) == {"feature"} and frame.unit.tolist() == list(range(64))
    assert len(world.components("neuron")) == 2992  # other granularities unchanged


def test_several_saes_and_a_stage_site(tiny_world_model, sae):
    from interp.core.features import attach, detach

    stage = _planted_sae(tiny_world_model, STAGE, 16, n=8, k=2)
    attached = attach(tiny_world_model, stage)
    attach(tiny_world_model, sae)
    try:
        assert attached.axis == 1  # a channel-first output
        c = tiny_world_model.space.parse(f"{STAGE}#f3")
        assert c.family == "sae" and c.kind == "Transformer2DModel" and c.block == "mid_block"
        comps = tiny_world_model.components("feature")
        assert len(comps) == 8 + 64 and comps[0].module == STAGE  # in execution order: the stage starts first
    finally:
        detach(tiny_world_model, STAGE)
        detach(tiny_world_model, SITE)


def test_attached_model_is_bitwise_the_original(tiny_world_model, tiny_red_objective, sae):
    from interp.core.features import attach, detach
    from interp.core.interventions import compile_plan

    obj = tiny_red_objective
    before = tiny_world_model.state_fingerprint()
    plain = _eps(tiny_world_model, obj)
    attach(tiny_world_model, sae)
    try:
        assert torch.equal(_eps(tiny_world_model, obj), plain)  # attaching changes no output
        comps = tiny_world_model.components("feature")
        plan = compile_plan(tiny_world_model, comps)
        ones = torch.ones(len(obj.x_t), len(comps))
        assert torch.equal(_eps(tiny_world_model, obj, plan, ones), plain)  # every m = 1: exactly h
        J = obj.values(plan, torch.ones(1, len(comps)))
        assert torch.equal(J[0], obj.intact)
    finally:
        detach(tiny_world_model, SITE)
    after = tiny_world_model.state_fingerprint()
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_feature_ablation_is_removing_its_decoder_contribution(world, sae, tiny_red_objective):
    """A known answer in plain torch: J with feature i zero-ablated equals J with ``f_i(h) W_dec[i]`` subtracted
    from the site's output by a forward hook, no intervention code involved."""
    from interp.core.interventions import compile_plan

    obj = tiny_red_objective
    comps = world.components("feature")
    plan = compile_plan(world, comps)
    with torch.no_grad():
        acts = sae.dense(_site_rows(world, obj))
    i = int(acts.abs().sum(0).argmax())  # a feature that is active
    mask = torch.ones(1, len(comps))
    mask[0, i] = 0
    with torch.no_grad():
        J = obj.values(plan, mask)[0]

    def hook(mod, args, out):
        f = sae.dense(out.reshape(-1, 16))[:, i]
        return out - (f[:, None] * sae.W_dec[i]).reshape(out.shape)

    J_hand = values_with_hook(obj, world.module(SITE), hook)
    torch.testing.assert_close(J, J_hand, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(J, obj.intact)


def test_steering_a_feature_reverses_its_decoder_contribution(world, sae, tiny_red_objective):
    """An ablation edit with multiplier -1 (feature steering) on a planted feature: the plan and multipliers it
    applies give J with ``2 f_i(h) W_dec[i]`` subtracted from the site's output, as a plain-torch hook computes it."""
    from interp.studies.editing.edits import AblationEdit

    obj = tiny_red_objective
    with torch.no_grad():
        acts = sae.dense(_site_rows(world, obj))
    i = int(acts.abs().sum(0).argmax())
    edit = AblationEdit(components=(f"{SITE}#f{i}",), multiplier=-1.0)
    with edit.apply(world) as edited:
        iv = edited.intervention
        assert iv["mult"].tolist() == [[-1.0]] and "x-1" in edit.label and edit.record()["mechanism"].startswith("steer")
        with torch.no_grad():
            J = obj.values(iv["plan"], iv["mult"])[0]

    def hook(mod, args, out):
        f = sae.dense(out.reshape(-1, 16))[:, i]
        return out - 2 * (f[:, None] * sae.W_dec[i]).reshape(out.shape)

    J_hand = values_with_hook(obj, world.module(SITE), hook)
    torch.testing.assert_close(J, J_hand, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="multiplier must be finite and not 1"):
        AblationEdit(components=(f"{SITE}#f{i}",), multiplier=1.0)


def _site_rows(model, obj):
    from interp.core.interventions import run_unet

    x, t, ctx = obj.x_t, obj.t, obj.ctx_target[obj.image_index]
    with torch.no_grad():
        h = run_unet(model, x, t, ctx, saves=[SITE])[1][SITE]
    return h.reshape(-1, h.shape[-1])


def test_mean_ablation_uses_feature_means(world, sae, tiny_red_objective):
    from interp.core.features import feature_means
    from interp.core.interventions import compile_plan
    from interp.core.objectives import reference_means

    obj = tiny_red_objective
    comps = world.components("feature")
    means = reference_means(obj, compile_plan(world, comps))
    rows = _site_rows(world, obj)
    torch.testing.assert_close(means[SITE], feature_means(sae, rows.reshape(len(obj.x_t), -1, 16)))
    df = interp.attribute("ablation", world, "red", comps[:4], objective=obj, mode="mean")
    assert len(df) == 4 and df.score.notna().all()


def _linear_objective(model, config):
    """The erase objective's evaluation set with J = mean over pixels of ``<c, eps>`` on the target branch: linear
    in the denoiser's output, so linear in the multipliers of features at its last layer (``conv_out``)."""
    from interp.core.interventions import run_unet
    from interp.core.objectives import Objective

    class LinearReadout(Objective):
        def _chunk(self, plan, mult, means, target_context, unet_patches, samples=None, recompute_text=False,
                   record=None, intervene_anchor=True, replay=False):
            sel = torch.arange(self.n_samples) if samples is None else torch.as_tensor(samples)
            r = 1 if mult is None else mult.shape[0]
            x, t = self.x_t[sel].repeat(r, 1, 1, 1), self.t[sel].repeat(r)
            ctx = self.ctx_target[self.image_index[sel]].repeat(r, 1, 1)
            rows = None if mult is None else mult.repeat_interleave(len(sel), 0)
            eps = run_unet(self.model, x, t, ctx, plan, rows, means)[0].to(self.dtype)
            return (eps * self.readout).flatten(1).mean(1).reshape(r, len(sel))

    LinearReadout.readout = torch.tensor([1.0, -2.0, 0.5]).reshape(1, 3, 1, 1)
    obj = LinearReadout(model, "red", config)
    obj.replay_prefix = False  # (its _chunk runs whole passes)
    return obj


def test_planted_features_true_ablation_equals_cad_where_j_is_linear(tiny_world_model, tiny_objective_config):
    """A known-answer model: exact planted features (an orthonormal basis of the 3 output channels) at the UNet's
    last layer and a J linear in its output. J is then linear in every feature multiplier, so true ablation,
    CAD (activation x gradient) and every gradient variant give the same scores, and a feature's effect is
    ``-mean f_i <W_dec[i], c>``, computed here by hand."""
    import interp
    from interp.core.features import attach, detach, planted

    model = tiny_world_model
    site = "unet.conv_out"
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    attach(model, planted(site, q, k=3))
    try:
        obj = _linear_objective(model, tiny_objective_config)
        comps = model.components("feature")
        assert comps.addresses == [f"{site}#f{i}" for i in range(3)]
        scores = {m: interp.attribute(m, model, "red", comps, objective=obj, **o).set_index("component").score
                  for m, o in (("ablation", {}), ("cad", {"n_groups": 1}), ("midpoint", {}), ("ig", {"steps": 2}))}
        truth = torch.tensor(scores["ablation"][comps.addresses].to_numpy())
        assert truth.abs().max() > 1e-4  # the features matter
        for m in ("cad", "midpoint", "ig"):
            torch.testing.assert_close(torch.tensor(scores[m][comps.addresses].to_numpy()), truth, rtol=1e-4,
                                       atol=1e-7, msg=m)
        # by hand: eps at the intact model, each feature's activation and its direction's readout
        from interp.core.interventions import run_unet

        with torch.no_grad():
            eps = run_unet(model, obj.x_t, obj.t, obj.ctx_target[obj.image_index], saves=[site])[1][site]
        f = torch.relu(torch.einsum("nchw,fc->nfhw", eps, q))  # planted: W_enc = W_dec = q, no biases, k = all
        by_hand = (f * (q @ obj.readout.flatten())[None, :, None, None]).mean((0, 2, 3)) / 3  # mean over 3 channels
        torch.testing.assert_close(by_hand.double(), truth, rtol=1e-4, atol=1e-7)
    finally:
        detach(model, site)


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_every_feature_method_returns_the_tidy_frame(world, tiny_red_objective, method):
    import interp
    from interp.core.results import SCHEMA  # noqa: F401  (the frame's columns)
    from interp.methods import get

    assert "feature" in get(method).capabilities.granularities
    comps = world.components("feature")[:12]
    opts = {"coar": {"n_masks": 24}, "maskgrad": {"n_masks": 4}, "ig": {"steps": 4}}.get(method, {})
    before = world.state_fingerprint()
    df = interp.attribute(method, world, "red", comps, objective=tiny_red_objective, **opts)
    main = df[df.variant == method] if "variant" in df and (df.variant == method).any() else df
    assert len(main) == 12 and set(main.granularity) == {"feature"} and main.score.notna().all()
    assert main.component.tolist() == comps.addresses
    after = world.state_fingerprint()
    assert all(torch.equal(before[n], after[n]) for n in before)  # a method never changes the model


def test_cad_on_features_is_the_multiplier_gradient(world, tiny_red_objective):
    """CAD falls back to dJ/dm at m = 1 for features (no weight slice): the midpoint gradient at alpha -> 0."""
    import interp
    from interp.core.engine import multiplier_gradients

    comps = world.components("feature")[:8]
    cad = interp.attribute("cad", world, "red", comps, objective=tiny_red_objective, n_groups=1)
    g = multiplier_gradients(tiny_red_objective, comps, torch.ones(1, 8, dtype=torch.float64))[0]
    torch.testing.assert_close(torch.tensor(cad.score.to_numpy()), g, rtol=1e-5, atol=1e-12)


def test_restoring_every_feature_of_an_exact_sae_is_restoring_the_site(tiny_world_model, tiny_red_objective):
    """Causal tracing's restoration of features, a known answer: with an SAE that reconstructs exactly, putting
    every feature's clean activation back into a corrupted output gives the clean output (row blocks of the clean
    output repeated as tracing passes them); m = 1 leaves the corrupted output as it is."""
    from interp.core.features import apply_features, planted

    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    sae = planted(SITE, torch.cat([q, -q]), k=32)
    g = torch.Generator().manual_seed(1)
    clean, corrupted = torch.randn(2, 5, 16, generator=g), torch.randn(6, 5, 16, generator=g)  # 3 row blocks of 2
    every = torch.arange(32)
    restored = apply_features(sae, corrupted, torch.zeros(6, 32), every, mean=clean)
    torch.testing.assert_close(restored, clean.repeat(3, 1, 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(apply_features(sae, corrupted, torch.ones(6, 32), every, mean=clean), corrupted)
    one = apply_features(sae, corrupted, torch.zeros(6, 1), every[:1], mean=clean)  # one feature: only its part
    f = lambda x: torch.relu(x @ sae.W_enc.T + sae.b_enc)[..., 0]  # noqa: E731  (planted: no top-k cut at k = 32)
    want = corrupted + (f(clean.repeat(3, 1, 1)) - f(corrupted))[..., None] * sae.W_dec[0]
    torch.testing.assert_close(one, want, rtol=1e-5, atol=1e-5)


def test_tracing_attributes_features_on_one_step_objectives(world, tiny_red_objective):
    import interp

    df = interp.attribute("tracing", world, "red", world.components("feature")[:4], objective=tiny_red_objective,
                          n_noise=1, maps=False)
    assert len(df) == 4 and df["score"].notna().all() and set(df["granularity"]) == {"feature"}


def test_bad_input_names_the_problem_and_the_fix(world, tiny_world_model):
    from interp.core.components import UnknownComponentError
    from interp.core.features import FeatureDictionary, attach

    with pytest.raises(ValueError, match=r"has 64 features, indices 0..63") as e:
        world.space.parse(f"{SITE}#f64")
    assert "\n" not in str(e.value) and isinstance(e.value, UnknownComponentError)
    with pytest.raises(ValueError, match="no sparse autoencoder is attached at .*attach one with"):
        world.space.parse("unet.mid_block.attentions.0.transformer_blocks.0.attn2#f0")
    wrong = FeatureDictionary(SITE, torch.randn(8, 12), torch.zeros(8), torch.randn(8, 12), torch.zeros(12), 2)
    with pytest.raises(ValueError, match=r"d_in=12 but that module's output has width 16: train one on this site") as e:
        attach(tiny_world_model, wrong)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="is no module of this model"):
        attach(tiny_world_model, FeatureDictionary("unet.nowhere", torch.randn(8, 16), torch.zeros(8),
                                                   torch.randn(8, 16), torch.zeros(16), 2))
    with pytest.raises(ValueError, match="k must be in 1..8"):
        FeatureDictionary(SITE, torch.randn(8, 16), torch.zeros(8), torch.randn(8, 16), torch.zeros(16), 9)
    from interp.core.interventions import compile_plan

    with pytest.raises(ValueError, match="appears both as a layer"):
        compile_plan(world, [f"{SITE}#f0", SITE])


def test_results_on_features_are_keyed_by_the_sae(tiny_world_model, tiny_red_objective, sae, tmp_path):
    """Another SAE at the same site gives the same addresses: a cached result must not be read for it."""
    import interp
    from interp.core.features import attach, detach

    comps = [f"{SITE}#f{i}" for i in range(4)]
    attach(tiny_world_model, sae)
    try:
        a = interp.attribute("cad", tiny_world_model, "red", comps, objective=tiny_red_objective, store=tmp_path)
        attach(tiny_world_model, _planted_sae(tiny_world_model, SITE, 16, n=64, k=4))
        b = interp.attribute("cad", tiny_world_model, "red", comps, objective=tiny_red_objective, store=tmp_path)
        assert a.config_hash[0] != b.config_hash[0]
    finally:
        detach(tiny_world_model, SITE)


def test_float64_objective_keeps_the_attached_sae(world, tiny_objective_config):
    import dataclasses

    import interp
    from interp.core.objectives import Objective

    obj = Objective(world, "red", dataclasses.replace(tiny_objective_config, dtype="float64"))
    df = interp.attribute("ablation", world, "red", world.components("feature")[:3], objective=obj)
    assert len(df) == 3


def test_train_sae_command(tmp_path, refused):
    import json

    from analyses import train_sae

    out = tmp_path / "sae"
    argv = ["--site", SITE, "--k", "4", "--expansion", "2", "--steps", "20", "--batch", "64", "--seeds", "0",
            "--gen-steps", "2", "--prompts", "a red circle", "a blue square", "--out", str(out), "--no-progress",
            "--threads", "1"]
    train_sae.main(argv)
    q = json.loads((out / "quality.json").read_text())
    from interp.core.features import load_sae

    sae = load_sae(out)
    assert sae.site == SITE and q["n_features"] == 2 * sae.d_in == sae.n_features and 0 < q["fvu"] and q["l0"] <= 4
    first = (out / "sae.safetensors").read_bytes()
    train_sae.main(argv)  # resumed from its folder: the same SAE
    assert (out / "sae.safetensors").read_bytes() == first
    assert "--k must be >= 1" in refused(train_sae.main, ["--k", "0", "--out", str(out)])
    assert "is no module of this model" in refused(train_sae.main, [*argv[2:], "--site", "unet.nowhere"])


def test_compare_methods_on_features_end_to_end(tiny_world_folder, tmp_path, refused, no_figures):
    """``compare_methods --granularity feature --sae FOLDER`` on the tiny world: every default method that
    attributes features (not causal tracing) runs, and the tables hold one row per feature."""
    import pandas as pd

    from analyses.compare_methods import main
    from interp.core.features import planted, save_sae

    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    save_sae(planted(SITE, torch.cat([q, -q]), k=4), tmp_path / "sae")
    common = ["--model", str(tiny_world_folder), "--concepts", "red", "--images", "1", "--timesteps", "300",
              "--lds-alphas", "0.2", "--heldout-masks", "10", "--n-boot", "100", "--no-progress", "--threads", "1"]
    assert main([*common, "--granularity", "feature", "--sae", str(tmp_path / "sae"), "--out",
                 str(tmp_path / "run")]) == 0
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    assert set(df.granularity) == {"feature"}
    assert {"ablation", "cad", "coar", "maskgrad", "ig", "midpoint", "screen", "tracing"} <= set(df.method)
    assert df[df.variant == "ablation"].component.nunique() == 32
    assert "need their sparse autoencoder: pass --sae" in refused(main, [*common, "--granularity", "feature",
                                                                          "--out", str(tmp_path / "x")])
    assert "holds no sae.safetensors" in refused(main, [*common, "--granularity", "feature", "--sae",
                                                        str(tmp_path), "--out", str(tmp_path / "x")])
    tangent = str(Path(__file__).resolve().parents[1] / "docs" / "examples" / "tangent_method.py")  # no features
    assert "do not attribute SAE features" in refused(main, [*common, "--granularity", "feature", "--sae",
                                                             str(tmp_path / "sae"), "--plugin", tangent, "--methods",
                                                             "ablation", "tangent", "--out", str(tmp_path / "x")])


@pytest.mark.slow
def test_edit_concepts_ablates_and_steers_features(tiny_world_folder, tmp_path, refused):
    """``edit_concepts --components features --sae FOLDER``: the ablation edits rank the SAE's latents, and
    ``--multiplier -1`` steers against them; bad combinations are refused by name before any work."""
    import json

    from analyses.edit_concepts import main
    from interp.core.features import planted, save_sae

    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    save_sae(planted(SITE, torch.cat([q, -q]), k=4), tmp_path / "sae")
    common = ["--model", str(tiny_world_folder), "--concepts", "red", "--images", "3", "--steps", "1",
              "--attr-images", "1", "--no-progress", "--threads", "1"]
    for multiplier in ("0", "-1"):
        out = tmp_path / f"run{multiplier}"
        assert main([*common, "--edits", "ablate:ablation", "--k", "2", "--components", "features", "--sae",
                     str(tmp_path / "sae"), "--multiplier", multiplier, "--out", str(out)]) == 0
        records = json.loads((out / "edits.json").read_text())
        record = next(r for r in (records if isinstance(records, list) else records["edits"]) if r["budget"] == 2)
        assert record["components"] and all("#f" in c for c in record["components"])
        assert record["mechanism"].startswith("ablation" if multiplier == "0" else "steering")
    assert "pass --sae FOLDER" in refused(main, [*common, "--components", "features", "--out", str(tmp_path / "x")])
    assert "is used with --components features" in refused(main, [*common, "--sae", str(tmp_path / "sae"),
                                                                  "--out", str(tmp_path / "x")])
    assert "--multiplier must be finite and not 1" in refused(main, [*common, "--multiplier", "1", "--out",
                                                                     str(tmp_path / "x")])


# -- ground truth: which features detect which attribute value (issue 40, item 4) -------------------------------------
def _labels(images):
    import pandas as pd

    from interp.world.vocab import ATTRIBUTES

    return pd.DataFrame({f"{a}:{v}": (images[a] == v).to_numpy() for a, vals in ATTRIBUTES.items() for v in vals})


def test_auroc_is_the_roc_auc_score():
    import numpy as np

    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=(40, 5)), 1)  # ties included
    labels = rng.random((40, 3)) < 0.4
    from scipy.stats import mannwhitneyu

    got = __import__("interp.core.features", fromlist=["auroc"]).auroc(scores, labels)
    # ROC AUC is the Mann-Whitney U of the positives against the negatives over their product (ties count half)
    want = np.array([[mannwhitneyu(scores[labels[:, v], f], scores[~labels[:, v], f]).statistic
                      / (labels[:, v].sum() * (~labels[:, v]).sum()) for f in range(5)] for v in range(3)])
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_planted_indicator_feature_has_auroc_one():
    """Known answer: planted site activations where one direction is exactly the indicator of "red" (and the other
    directions carry random non-negative amounts), and a hand-built SAE whose feature 0's encoder and decoder are
    that direction: feature 0 detects red with AUROC 1, and it is red's best feature."""
    import numpy as np
    import pandas as pd

    from interp.core.features import ground_truth_table, planted, site_means
    from interp.world.vocab import ATTRIBUTES

    rng = np.random.default_rng(0)
    n, positions, d = 48, 5, 16
    images = pd.DataFrame({a: [vals[i] for i in rng.integers(0, len(vals), n)] for a, vals in ATTRIBUTES.items()})
    red = torch.tensor((images["color"] == "red").to_numpy(), dtype=torch.float32)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(1)))
    coef = torch.rand(n, positions, d, generator=torch.Generator().manual_seed(2))
    coef[:, :, 0] = red[:, None] * 3.0  # direction 0 is on exactly where the prompt names red
    h = coef @ q  # (N, P, d): non-negative sums of the orthonormal directions: the planted SAE encodes them exactly
    sae = planted(SITE, q, k=d)
    f, neurons = site_means(sae, h)
    assert torch.allclose(f[:, 0], red * 3.0, atol=1e-5)
    assert torch.allclose(site_means(sae, h, pool="max")[0][:, 0], red * 3.0, atol=1e-5)
    table = ground_truth_table(f.numpy(), neurons.numpy(), _labels(images)).set_index("value")
    assert table.loc["red", "feature"] == 0 and table.loc["red", "feature_auroc"] == 1.0
    assert table.loc["red", "monosemantic"]
    assert len(table) == 16 and table["feature_auroc"].between(0, 1).all()


@pytest.mark.slow  # several seconds: the ground-truth command end to end
def test_sae_ground_truth_command(tiny_world_folder, tmp_path, refused):
    """``python -m analyses.sae_ground_truth`` on the tiny world with a tiny SAE trained here: 16 rows with AUROCs
    in [0, 1], each value's best feature at least 0.5, the summary, the gallery and the report."""
    import json

    import pandas as pd

    import interp
    from analyses.sae_ground_truth import main
    from interp.core.features import collect_activations, save_sae, train_sae

    model = interp.load_model(str(tiny_world_folder))
    acts = collect_activations(model, SITE, ["a red circle", "a blue square"], seeds=(0,), steps=2)
    save_sae(train_sae(acts, k=4, expansion=2, steps=20, batch=32, site=SITE), tmp_path / "sae")
    out = tmp_path / "gt"
    argv = ["--model", str(tiny_world_folder), "--sae", str(tmp_path / "sae"), "--images", "32", "--steps", "3",
            "--top", "2", "--device", "cpu", "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    table = pd.read_csv(out / "table.csv")
    assert len(table) == 16 and table["value"].nunique() == 16
    for c in ("feature_auroc", "neuron_auroc", "auroc_high", "auroc_low"):
        assert table[c].between(0, 1).all(), c
    assert (table["feature_auroc"] >= 0.5).all()
    s = json.loads((out / "summary.json").read_text())
    assert s["n_values"] == 16 and 0 <= s["fraction_monosemantic"] <= 1 and s["n_images"] == 32
    images = pd.read_csv(out / "images.csv")
    assert len(images) == 32 and "pred_color" in images
    assert (out / "figures" / "gallery.png").stat().st_size > 1000
    assert "Feature gallery" in (out / "index.html").read_text()
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    assert "--sae is required" in refused(main, ["--out", str(tmp_path / "x")])
    assert "holds no sae.safetensors" in refused(main, ["--sae", str(tmp_path), "--out", str(tmp_path / "x")])
    assert "--images must be >= 16" in refused(main, [*argv, "--images", "4"])
    assert main([*argv, "--pool", "max", "--out", str(tmp_path / "gt-max")]) == 0
    assert json.loads((tmp_path / "gt-max" / "summary.json").read_text())["pool"] == "max"
    splice = s["splice"]  # the default --splice-images 64
    assert splice["n_images"] == 64 and splice["loss_intact"] > 0 and splice["loss_ratio"] > 0
    assert 0 <= splice["fidelity_spliced"] <= 1 and "fidelity_color_intact" in splice
    assert "--splice-images must be >= 0" in refused(main, [*argv, "--splice-images", "-1"])


def test_splicing_an_exact_sae_changes_nothing_and_a_lossy_one_does(tiny_world_model):
    """A known answer: spliced in, an SAE that reconstructs exactly (the planted directions +q and -q of an
    orthonormal basis, every latent active) leaves the denoiser's output as it was, a lossy one (k = 2 of them)
    changes it, and the hook is gone afterwards, also after an error inside."""
    from interp.core.features import planted, spliced
    from interp.core.interventions import call_denoiser, encode_prompts

    model = tiny_world_model
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    exact, lossy = planted(SITE, torch.cat([q, -q]), k=32), planted(SITE, torch.cat([q, -q]), k=2)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([300, 700])
    with torch.no_grad():
        ctx = encode_prompts(model, model.tokenize(["a red circle", "a blue square"]))
        intact = call_denoiser(model, x, t, ctx)
        with spliced(model, exact):
            same = call_denoiser(model, x, t, ctx)
        with spliced(model, lossy):
            other = call_denoiser(model, x, t, ctx)
        with pytest.raises(RuntimeError, match="inside"), spliced(model, lossy):
            raise RuntimeError("inside")
        after = call_denoiser(model, x, t, ctx)
    torch.testing.assert_close(same, intact, rtol=1e-4, atol=1e-5)
    assert (other - intact).abs().max() > 1e-3
    assert torch.equal(after, intact) and not model.module(SITE)._forward_hooks


@pytest.mark.slow  # two generations of 16 images and five denoising-loss passes
def test_splice_effect_of_an_exact_sae_is_none(tiny_world_folder):
    from interp.core.features import planted, splice_effect
    from interp.core.judges import load_judge

    model = interp.load_model(str(tiny_world_folder))  # with its (random) classifier as the judge
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    judge = load_judge("classifier", model=model)
    exact = splice_effect(model, planted(SITE, torch.cat([q, -q]), k=32), n_images=16, steps=2, judge=judge)
    assert exact["loss_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert exact["fidelity_spliced"] == exact["fidelity_intact"]
    lossy = splice_effect(model, planted(SITE, torch.cat([q, -q]), k=1), n_images=16, steps=2, judge=judge)
    # (the tiny random model's feed-forward is a small part of its output: the lossy splice moves the loss ~1e-4)
    assert lossy["loss_intact"] == exact["loss_intact"] and abs(lossy["loss_ratio"] - 1) > 2e-5


#: A site per family of the tiny pipelines: a UNet attention stage (SAeUron's kind of site: its channel-first output
#: gives one row per spatial position) or a transformer block's feed-forward (one row per token).
FAMILY_SITES = {"sd1": "unet.mid_block.attentions.0", "sd2": "unet.mid_block.attentions.0",
                "sdxl": "unet.mid_block.attentions.0", "pixart": "transformer.transformer_blocks.0.ff",
                "sd3": "transformer.transformer_blocks.0.ff", "flux": "transformer.transformer_blocks.0.ff"}


@pytest.mark.slow  # a tiny pipeline of every family: generations, an SAE each, two methods on its features
@pytest.mark.parametrize("family", sorted(FAMILY_SITES))
def test_every_family_trains_and_attributes_features(family, tmp_path):
    """The SAE path on Stable Diffusion and the diffusion transformers, not only the concept world: activations over
    generation at the family's site, a trained SAE attached (the model's output bitwise unchanged), and true ablation
    and CAD on its features; ablating every feature changes the objective."""
    import interp
    from interp.core.features import attach, collect_activations, train_sae
    from interp.core.objectives import ObjectiveConfig
    from interp.testing import tiny_pipeline

    model = interp.load_model(tiny_pipeline(tmp_path / family, family), device="cpu")
    site = FAMILY_SITES[family]
    acts = collect_activations(model, site, ["a red circle", "a blue square"], seeds=(0, 1), steps=2)
    assert acts.dim() == 2 and len(acts) > 0 and torch.isfinite(acts).all()
    sae = attach(model, train_sae(acts, k=2, expansion=2, steps=30, batch=64, site=site))
    comps = model.components("feature")
    assert len(comps) == sae.n_features and all(c.module == site for c in comps)
    cfg = ObjectiveConfig(kind="erase", n_images=1, timesteps=(500,), gen_steps=2)
    truth = interp.attribute("ablation", model, interp.text_concept("red", n=1), comps, objective=cfg)
    cad = interp.attribute("cad", model, interp.text_concept("red", n=1), comps, objective=cfg)
    for df in (truth, cad):
        assert len(df) == len(comps) and df["score"].notna().all()
    assert (truth["score"] != 0).any(), "ablating the features changed nothing"
