"""``concept-world-dit``: an SD3 transformer trained with flow matching on concept-world-latent's VAE latents and
frozen text tower, shipped as a plain StableDiffusion3Pipeline folder; loaded by name as a concept-world model;
its conditioning in training is the suite's SD3 family's; the shipped files are the training command's (config
hash); a killed training resumes to the uninterrupted weights; the methods run on it."""

from __future__ import annotations

import json

import pytest
import torch

import interp
from interp.core.families import unpack
from interp.world.dit import (
    BASE,
    DiTModelConfig,
    DiTTrainConfig,
    build_dit_pipeline,
    encode_captions,
    sample_sigmas,
    save_dit,
    train_dit,
)
from interp.world.plugin import ASSETS, DIT_WORLD, is_dit_world_folder, is_latent_world_folder, is_world_folder

SHIPPED = ASSETS / "concept-world-dit"
TARGETS = {"color": 0.95, "shape": 0.95, "texture": 0.90, "background": 0.95}
PROMPTS = ["a red solid circle on black", "a photo of a blue square", "", "an image of a hollow cyan cross"]


def _shipped() -> dict:
    if not (SHIPPED / "fidelity.json").exists():
        pytest.fail("no shipped concept-world-dit: train it with `python -m analyses.train_world --model "
                    "concept-world-dit`")
    return json.loads((SHIPPED / "fidelity.json").read_text())


@pytest.fixture(scope="module")
def shipped_model():
    _shipped()
    return interp.load_model("concept-world-dit", device="cpu")


# -- the shipped folder ----------------------------------------------------------------------------------------------
def test_shipped_dit_is_a_plain_sd3_folder_that_diffusers_loads_offline(monkeypatch):
    from diffusers import StableDiffusion3Pipeline
    from safetensors import safe_open

    _shipped()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    index = json.loads((SHIPPED / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_encoder"] == index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    pipe = StableDiffusion3Pipeline.from_pretrained(SHIPPED / "pipeline", dtype=torch.float32, local_files_only=True)
    assert pipe.vae.config.shift_factor == 0.0 and pipe.tokenizer_3.model_max_length == 16
    image = pipe("a red solid circle on black", num_inference_steps=2, max_sequence_length=16,
                 output_type="pt").images
    assert image.shape == (1, 3, 32, 32)
    # the diffusers pipeline with max_sequence_length=16 is the suite's generation, exactly
    m = interp.load_model("concept-world-dit", device="cpu")
    x = interp.core.diffusion.initial_noise(m.unet, 1, torch.Generator().manual_seed(0))
    mine = interp.generate(m, ["a red solid circle on black"], steps=3, guidance=2.0, latents=x)
    theirs = pipe("a red solid circle on black", num_inference_steps=3, guidance_scale=2.0, latents=x,
                  max_sequence_length=16, output_type="pt").images
    torch.testing.assert_close(mine, theirs.float(), atol=1e-5, rtol=0)
    weights = list((SHIPPED / "pipeline").rglob("*.safetensors"))
    assert len(weights) == 5 and sum(f.stat().st_size for f in weights) < 15e6
    for f in weights:
        with safe_open(str(f), "pt") as st:
            assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.float16}, f


def test_shipped_dit_loads_by_name_as_a_concept_world_model(shipped_model):
    from diffusers import StableDiffusion3Pipeline

    m = shipped_model
    assert is_dit_world_folder(SHIPPED) and not is_latent_world_folder(SHIPPED) and not is_world_folder(SHIPPED)
    assert type(m.pipeline) is StableDiffusion3Pipeline and m.family.name == "sd3" and m.family.noise == "flow"
    assert m.world is DIT_WORLD and m.is_concept_world and m.classifier is not None
    assert m.default_guidance == json.loads((SHIPPED / "world.json").read_text())["default_guidance"]
    assert m.vae is not None and interp.core.diffusion.latent_shape(m.unet, 2) == (2, 4, 8, 8)
    img = interp.generate(m, ["a red solid circle on black"], seed=0, steps=2)
    assert img.shape == (1, 3, 32, 32)


def test_shipped_text_encoders_are_the_latent_models_tower_with_an_identity_projection(shipped_model):
    """Both CLIPs with projection are concept-world-latent's frozen text tower, unchanged: the same hidden states,
    and ``text_embeds`` = the tower's pooled output."""
    latent = interp.load_model(BASE, device="cpu")
    ids = latent.tokenize(PROMPTS)
    with torch.no_grad():
        ref = latent.pipeline.text_encoder(ids, output_hidden_states=True)
        for part in ("text_encoder", "text_encoder_2"):
            out = getattr(shipped_model.pipeline, part)(ids, output_hidden_states=True)
            for a, b in zip(out.hidden_states, ref.hidden_states):
                assert torch.equal(a, b), part
            assert torch.equal(out.text_embeds, ref.pooler_output), part


def test_training_conditions_the_transformer_as_the_suite_does(shipped_model):
    """The context the transformer was trained on (the pipeline's ``encode_prompt``: 16 zero rows from the all-zero
    T5) is the suite's SD3 family's packed context, exactly."""
    from interp.core.interventions import encode_prompts

    m = shipped_model
    states, extra = unpack(encode_prompts(m, m.tokenize(PROMPTS)), m.layout)
    embeds, pooled = encode_captions(m.pipeline, PROMPTS)
    assert embeds.shape == (len(PROMPTS), 32, 128) and torch.equal(states, embeds)
    assert torch.equal(extra["pooled"], pooled) and not embeds[:, 16:].any()


def test_shipped_dit_is_what_the_training_command_makes():
    """The command without flags is the shipped recipe (its config hash), on one thread, on the shipped VAE and
    text tower."""
    from analyses.train_world import dit_config, parse

    assert dit_config(parse(["--model", "concept-world-dit"])) == DiTTrainConfig()
    shipped = json.loads((SHIPPED / "train_config.json").read_text())
    assert shipped["config_hash"] == DiTTrainConfig().hash()
    assert shipped["threads"] == 1
    from interp.world.dit import base_parts

    assert shipped["base_weights_digest"] == base_parts()[3]
    cfg = dit_config(parse(["--model", "concept-world-dit", "--steps", "7", "--batch-size", "8", "--seed", "3"]))
    assert (cfg.steps, cfg.batch_size, cfg.seed) == (7, 8, 3)


@pytest.mark.parametrize("flag", [["--vae-steps", "5"], ["--clip-steps", "5"], ["--text-encoder", "joint"]])
def test_training_command_refuses_flags_of_the_reused_parts(tmp_path, flag):
    from analyses.train_world import main

    with pytest.raises(SystemExit, match="reuses concept-world-latent's VAE"):
        main(["--model", "concept-world-dit", "--out", str(tmp_path), *flag])
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # several seconds: generations of the shipped DiT judged
def test_shipped_dit_fidelity_is_what_it_claims(shipped_model):
    """24 of the same held-out prompts regenerated; each attribute within a binomial margin of the claim."""
    from scipy.stats import binom

    from interp.world.fidelity import measure_fidelity

    claimed = _shipped()
    assert claimed["targets"] == TARGETS
    assert claimed["meets_targets"] == all(claimed["accuracy"][a] >= t for a, t in TARGETS.items())
    assert claimed["guidance"] == shipped_model.default_guidance
    n = 24
    again, _ = measure_fidelity(shipped_model, n=n, seed=claimed["seed"], steps=claimed["steps"],
                                guidance=claimed["guidance"], batch=n)
    for a in TARGETS:
        p = min(claimed["accuracy"][a], 0.99)
        low = binom.ppf(0.001, n, p) / n
        assert again["accuracy"][a] >= low, (a, again["accuracy"][a], claimed["accuracy"][a], low)


@pytest.mark.parametrize("method", ["cad", "ablation"])
def test_attribution_runs_on_the_shipped_dit(shipped_model, method):
    m = shipped_model
    comps = m.components("neuron", kind="ff.net.2")
    last = comps[-1].module
    comps = interp.ComponentSet([c for c in comps if c.module == last][:6])
    oc = interp.ObjectiveConfig(n_images=2, timesteps=(300, 700))
    df = interp.attribute(method, m, "red", comps, objective=oc)
    main = df[df["variant"] == method] if "variant" in df else df
    assert list(main["component"]) == comps.addresses and main["score"].notna().all()


# -- training ----------------------------------------------------------------------------------------------------------
def _tiny_cfg(**kw) -> DiTTrainConfig:
    return DiTTrainConfig(**{"model": DiTModelConfig.tiny(), "steps": 6, "batch_size": 4, "warmup": 1,
                             "log_every": 2, "save_every": 2, **kw})


def test_logit_normal_sigmas_are_sd3s():
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(DiTTrainConfig(), 20000, g)
    assert 0 < float(s.min()) and float(s.max()) < 1
    assert abs(float(torch.logit(s).mean())) < 0.03 and abs(float(torch.logit(s).std()) - 1) < 0.03
    u = sample_sigmas(DiTTrainConfig(timesteps="uniform"), 20000, g)
    assert abs(float(u.mean()) - 0.5) < 0.01
    with pytest.raises(ValueError, match="timesteps"):
        DiTTrainConfig(timesteps="cosine")


def test_tiny_dit_training_resumes_identically(tmp_path, monkeypatch):
    """Killed at step 5 (after the state saved at step 4), the rerun continues from it and ends with bitwise the
    weights and losses of the uninterrupted run; the reused VAE and text towers are left exactly as shipped."""
    import interp.world.render as render_mod

    cfg = _tiny_cfg()
    ref, ref_hist, ref_rec = train_dit(cfg, tmp_path / "ref", progress=False)
    assert [h["step"] for h in ref_hist] == [2, 4, 6]

    class Killed(Exception):
        pass

    real, calls = render_mod.render_batch, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(render_mod, "render_batch", dying)
    with pytest.raises(Killed):
        train_dit(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "train_state.pt").exists()
    monkeypatch.setattr(render_mod, "render_batch", real)
    pipe, hist, rec = train_dit(cfg, tmp_path / "run", progress=False)
    assert [h["loss"] for h in hist] == [h["loss"] for h in ref_hist]
    for (n, p), (_, q) in zip(pipe.transformer.named_parameters(), ref.transformer.named_parameters()):
        assert torch.equal(p, q), n
    assert rec["base_weights_digest"] == ref_rec["base_weights_digest"]
    fresh, digest = build_dit_pipeline(cfg.model)
    assert digest == rec["base_weights_digest"]
    for part in ("vae", "text_encoder", "text_encoder_2"):
        for (n, p), (_, q) in zip(getattr(pipe, part).named_parameters(), getattr(fresh, part).named_parameters()):
            assert torch.equal(p, q), f"{part}.{n}"


def test_tiny_dit_folder_loads_and_runs_the_methods(tmp_path):
    """A tiny trained folder, written as the command writes it, loads by path as concept-world-dit."""
    cfg = _tiny_cfg(steps=2)
    pipe, hist, rec = train_dit(cfg, tmp_path, progress=False)
    save_dit(pipe, tmp_path, cfg, hist, rec)
    (tmp_path / "world.json").write_text(json.dumps({"kind": "concept-world-dit", "image_size": 32}))
    assert not (tmp_path / "train_state.pt").exists()
    m = interp.load_model(str(tmp_path), device="cpu")
    assert m.world is DIT_WORLD and m.family.name == "sd3"
    comps = interp.ComponentSet(list(m.components("neuron", kind="ff.net.2"))[:4])
    df = interp.attribute("cad", m, "red", comps, objective=interp.ObjectiveConfig(n_images=2, timesteps=(500,)))
    assert df["score"].notna().all()


# -- slow tier ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_short_training_command_reproduces_its_files_bitwise(tmp_path):
    """Two runs of the training command (a short one: 20 steps of batch 8, 24 fidelity images) write bitwise the
    same weights, fidelity and sample grid: training and evaluation are deterministic for a thread count."""
    from analyses.train_world import main

    argv = ["--model", "concept-world-dit", "--steps", "20", "--batch-size", "8", "--fidelity-images", "24",
            "--no-progress", "--threads", "1"]
    for run in ("a", "b"):
        assert main([*argv, "--out", str(tmp_path / run)]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert any(str(f).endswith(".safetensors") for f in files) and len(files) > 8
    for f in files:
        if f.name == "train_config.json":  # holds the wall-clock seconds
            a, b = (json.loads((tmp_path / r / f).read_text()) for r in ("a", "b"))
            assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
            continue
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
