"""Stable Diffusion as a first-class target: tiny random SD 1.x-style (PNDM, conv projections, pad = end-of-text)
and SD 2.x-style (v-prediction, DDIM, linear projections, per-block heads, upcast attention) pipelines of the real
classes, saved and loaded offline, with every scheduler swapped in."""

from __future__ import annotations

import warnings

import pytest
import torch

import interp
from interp.core.objectives import Objective, ObjectiveConfig
from interp.testing import SCHEDULERS, tiny_stable_diffusion

STYLES = ("sd1", "sd2")


@pytest.fixture(scope="module")
def sd_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {style: tiny_stable_diffusion(root / style, style) for style in STYLES}


@pytest.fixture(scope="module")
def sd_models(sd_folders):
    return {style: interp.load_model(folder, device="cpu") for style, folder in sd_folders.items()}


def test_styles_are_what_they_claim(sd_models):
    sd1, sd2 = sd_models["sd1"], sd_models["sd2"]
    assert type(sd1.scheduler).__name__ == "PNDMScheduler"
    assert sd1.tokenizer.pad_token_id == sd1.tokenizer.eos_token_id  # CLIP's SD 1.x tokenizer pads with end-of-text
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    assert sd2.tokenizer.pad_token_id != sd2.tokenizer.eos_token_id
    assert sd2.unet.config.use_linear_projection and sd2.unet.config.upcast_attention


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_samples_and_builds_the_evaluation_set(tmp_path, style, scheduler):
    model = interp.load_model(tiny_stable_diffusion(tmp_path / "m", style, scheduler=scheduler), device="cpu")
    assert type(model.scheduler).__name__ == scheduler
    state = repr(model.scheduler.__dict__)
    a = interp.generate(model, ["a photo of red", "a photo of blue"], steps=3, seed=1)
    b = interp.generate(model, ["a photo of red", "a photo of blue"], steps=3, seed=1)
    c = interp.generate(model, ["a photo of red", "a photo of blue"], steps=3, seed=2)
    assert a.shape == (2, 3, 16, 16) and torch.isfinite(a).all()
    assert torch.equal(a, b), "seeded sampling must be reproducible (stochastic schedulers included)"
    assert not torch.equal(a, c)
    for kind in ("erase", "amplify"):
        obj = Objective(model, interp.text_concept("red"), ObjectiveConfig(kind=kind, n_images=2, gen_steps=3,
                                                                          timesteps=(100, 700)))
        assert obj.intact.shape == (4,) and torch.isfinite(obj.intact).all()
    # the model's own scheduler is never stepped (multistep schedulers keep state)
    assert repr(model.scheduler.__dict__) == state


def test_text_concept_default_agrees_with_the_default_objective(sd_models):
    """The README's example: ``text_concept("red")`` (4 prompts) with the default config (4 images) works; more
    images cycle through the prompts."""
    obj = Objective(sd_models["sd1"], interp.text_concept("red"), ObjectiveConfig(gen_steps=2, timesteps=(500,)))
    assert obj.target_prompts == list(interp.text_concept("red").target_prompts)
    obj = Objective(sd_models["sd1"], interp.text_concept("red"), ObjectiveConfig(n_images=8, gen_steps=2,
                                                                                  timesteps=(500,)))
    assert len(obj.target_prompts) == 8 and obj.target_prompts[:4] == obj.target_prompts[4:]
    with pytest.warns(UserWarning, match="n_images=4"):
        obj = Objective(sd_models["sd1"], interp.text_concept("red", n=4), ObjectiveConfig(n_images=2, gen_steps=2,
                                                                                          timesteps=(500,)))
    assert len(obj.target_prompts) == 2


def test_float32_and_float64_evaluation_sets_agree_up_to_rounding(sd_models, tiny_world_model):
    for model, concept in ((tiny_world_model, "red"), (sd_models["sd2"], interp.text_concept("red"))):
        cfg = ObjectiveConfig(n_images=2, gen_steps=2, timesteps=(100, 700))
        o32 = Objective(model, concept, cfg)
        o64 = Objective(model, concept, ObjectiveConfig(**{**cfg.to_dict(), "dtype": "float64"}))
        assert torch.equal(o64.noise, o32.noise.double())  # the same draw, cast
        torch.testing.assert_close(o64.x_t, o32.x_t.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o64.intact, o32.intact.double(), rtol=1e-3, atol=1e-7)


def test_bfloat16_forward_passes_accumulate_in_float32(sd_models):
    model = sd_models["sd1"]
    cfg = ObjectiveConfig(n_images=2, gen_steps=2, timesteps=(100, 700))
    o32 = Objective(model, interp.text_concept("red"), cfg)
    obf = Objective(model, interp.text_concept("red"), ObjectiveConfig(**{**cfg.to_dict(), "dtype": "bfloat16"}))
    assert obf.model.dtype == torch.bfloat16 and obf.intact.dtype == torch.float32
    assert model.dtype == torch.float32  # the user's model is untouched
    torch.testing.assert_close(obf.intact, o32.intact, rtol=0.1, atol=1e-6)
    comps = model.components("neuron", family="ff", kind="ff.net.2")[:8]
    df = interp.attribute("cad", model, interp.text_concept("red"), comps, objective=obf)
    assert df["score"].notna().all()


@pytest.mark.parametrize("style", STYLES)
def test_your_own_model_calls_run_unchanged(sd_models, style):
    """The README's "Your own model" calls, on both families."""
    model = sd_models[style]
    comps = model.components("neuron", family="ff", kind="ff.net.2", block="down_blocks.0")
    cfg = ObjectiveConfig(n_images=2, gen_steps=2, timesteps=(300, 700))
    concept = interp.text_concept("van gogh style")
    before = model.state_fingerprint()
    for method in ("cad", "ablation", "maskgrad", "tracing"):
        df = interp.attribute(method, model, concept, comps, objective=cfg, **({"n_noise": 1} if method == "tracing" else {}))
        assert len(df[df["variant"] == method]) == len(comps)
    after = model.state_fingerprint()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("style", STYLES)
def test_text_tracing_map_covers_positions_after_the_subject(sd_models, style):
    """End-of-text and padding positions after the subject are in the layer x token map (SD 1.x pads with the
    end-of-text token, so they cannot be found from pad_token_id)."""
    model = sd_models[style]
    comps = model.components("layer", family="text_layer")
    tracing = interp.methods.get("tracing")(n_noise=1)
    args = (model, interp.text_concept("red"), comps)
    objective = ObjectiveConfig(n_images=2, gen_steps=2, timesteps=(500,))
    run = tracing.run(*args, objective=objective)
    df, maps = run.scores, run.maps
    tokens = maps.loc[maps["axis"] == "token", "position"]
    L = model.tokenizer.model_max_length
    eot = df.attrs["meta"]["end_of_text_offsets"]
    assert tokens.min() < 0 and tokens.max() > 0
    assert max(eot) in set(tokens) and tokens.max() > max(eot)  # end-of-text and the padding after it
    subj = df.attrs["meta"]["subject_positions"]
    assert tokens.max() == L - 1 - min(p[-1] for p in subj)


def test_a_word_split_into_letters_is_warned_about(sd_models):
    with pytest.warns(UserWarning, match="single characters"):
        Objective(sd_models["sd1"], "zebra", ObjectiveConfig(n_images=2, gen_steps=2, timesteps=(500,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        interp.core.concepts.check_tokenization(sd_models["sd1"].tokenizer, "van gogh style")


def test_missing_local_paths_are_reported_as_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        interp.load_model("runs/missing-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        interp.load_model("./nothing/here")


def _as_downloaded(folder, out, *, safety_checker: bool = True, variant: str | None = None):
    """``folder``'s pipeline saved as Stable Diffusion 1.x folders come: with a safety checker and a feature extractor
    (tiny random ones of the real classes), or with only ``variant`` weight files."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    parts = StableDiffusionPipeline.from_pretrained(folder).components
    if safety_checker:
        tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        parts.update(safety_checker=StableDiffusionSafetyChecker(CLIPConfig(
            text_config=tower, vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=16)),
            feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
    pipe = StableDiffusionPipeline(**parts, requires_safety_checker=safety_checker)
    if variant == "fp16":
        pipe.to(torch.float16)
    pipe.save_pretrained(out, variant=variant)
    return out


def test_the_safety_checker_is_never_loaded_and_may_be_missing(sd_folders, tmp_path):
    """SD 1.x folders list a safety checker (~300 M parameters in SD 1.5) that the suite never runs: it is not loaded,
    the model is the same (every weight), and a folder whose user deleted it loads too; a part the suite needs that
    is missing is named."""
    import shutil

    from interp.core.models import ModelLoadError

    def same(a, b):
        wa, wb = a.state_fingerprint(), b.state_fingerprint()
        return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    folder = _as_downloaded(sd_folders["sd1"], tmp_path / "sd")
    index = (folder / "model_index.json").read_text()
    assert "StableDiffusionSafetyChecker" in index and (folder / "safety_checker").is_dir()
    model = interp.load_model(folder, device="cpu")
    assert model.pipeline.safety_checker is None and model.pipeline.feature_extractor is None
    assert same(model, interp.load_model(sd_folders["sd1"], device="cpu"))
    shutil.rmtree(folder / "safety_checker")
    shutil.rmtree(folder / "feature_extractor")
    assert same(interp.load_model(folder, device="cpu"), model)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(ModelLoadError, match=r"lists a text_encoder \(CLIPTextModel\).*no text_encoder/ folder"):
        interp.load_model(folder, device="cpu")


def test_a_folder_with_only_fp16_weight_files_loads(sd_folders, tmp_path):
    """A folder downloaded with only its ``*.fp16.safetensors`` files loads (diffusers needs ``variant="fp16"``
    for it and otherwise names a missing file), in the precision asked for."""
    base = interp.load_model(sd_folders["sd1"], device="cpu")
    folder = _as_downloaded(sd_folders["sd1"], tmp_path / "sd", safety_checker=False, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    model = interp.load_model(folder, device="cpu")
    assert model.unet.dtype == torch.float32
    for ours, theirs in ((model.unet, base.unet), (model.text_encoder, base.text_encoder)):
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            assert torch.equal(a, b.half().float()), name  # the fp16 files' values, cast to float32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_results_match_cpu(sd_folders):
    cpu = interp.load_model(sd_folders["sd1"], device="cpu")
    gpu = interp.load_model(sd_folders["sd1"], device="cuda")
    cfg = ObjectiveConfig(n_images=2, gen_steps=2, timesteps=(300, 700))
    comps = cpu.components("neuron", family="ff", kind="ff.net.2", block="down_blocks.0")
    for method in ("ablation", "cad"):
        a = interp.attribute(method, cpu, interp.text_concept("red"), comps, objective=cfg)
        b = interp.attribute(method, gpu, interp.text_concept("red"), comps, objective=cfg)
        torch.testing.assert_close(torch.tensor(b["score"].to_numpy()), torch.tensor(a["score"].to_numpy()),
                                   rtol=1e-3, atol=1e-7)


def test_device_names_are_checked():
    from interp.core.models import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")


def _compare_on(folder, out):
    from analyses import compare_methods

    argv = ["--model", str(folder), "--concepts", "red", "--blocks", "down_blocks.0", "--images", "2",
            "--timesteps", "300", "700", "--heldout-masks", "12", "--coar-masks", "48", "--tracing-noise", "1",
            "--lds-alphas", "0.05", "0.2", "--no-progress", "--threads", "1", "--out", str(out)]
    assert compare_methods.main(argv) == 0
    import json

    import pandas as pd

    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "complete"
    results = pd.read_parquet(out / "results.parquet")
    assert set(results["method"]) >= {"ablation", "cad", "coar", "maskgrad", "tracing"}
    assert (out / "index.html").stat().st_size > 10_000
    corr = pd.read_csv(out / "tables" / "correlations.csv")
    assert corr["spearman"].notna().any()
    return results


@pytest.mark.parametrize("style", STYLES)
def test_compare_methods_runs_on_a_stable_diffusion_folder(sd_folders, tmp_path, style, no_figures):
    """`compare_methods --model <folder>` on the SD 1.x-style (PNDM) and SD 2.x-style (v-prediction) pipelines."""
    _compare_on(sd_folders[style], tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", [s for s in SCHEDULERS if s != "PNDMScheduler"])
def test_compare_methods_runs_with_every_scheduler_swapped_in(tmp_path, scheduler, no_figures):
    folder = tiny_stable_diffusion(tmp_path / "m", "sd1", scheduler=scheduler)
    _compare_on(folder, tmp_path / "run")


def test_generation_steps_and_guidance_are_options_of_every_command(sd_models, monkeypatch, refused):
    """The objective's generations on Stable Diffusion (its evaluation images; the classifier objective's images)
    run at the steps and guidance a command is given: --gen-steps/--guidance of compare_methods and erasure_curves,
    --attr-steps/--guidance of edit_concepts; bad values are one-line errors before anything loads."""
    import interp.core.objectives as objectives_mod
    from analyses import edit_concepts, erasure_curves
    from interp.studies.compare_config import CompareConfig

    seen = []
    real = objectives_mod.generate

    def spy(model, prompts, seed=0, steps=20, guidance=None, **kw):
        seen.append((steps, guidance))
        return real(model, prompts, seed=seed, steps=steps, guidance=guidance, **kw)

    monkeypatch.setattr(objectives_mod, "generate", spy)
    cfg = CompareConfig(gen_steps=3, guidance=2.0, n_images=2, timesteps=(500,))
    Objective(sd_models["sd1"], interp.text_concept("red"), cfg.objective_config())
    assert seen == [(3, 2.0)]
    assert CompareConfig().objective_config() == ObjectiveConfig()  # the API's defaults are the command line's
    from analyses._cli import config_from_args

    args = erasure_curves.build_parser().parse_args(["--gen-steps", "4", "--guidance", "3"])
    ranking = erasure_curves.ranking_config(config_from_args(erasure_curves.ErasureCurvesConfig, args), None)
    assert (ranking.objective_config().gen_steps, ranking.objective_config().guidance) == (4, 3.0)
    from interp.studies.compare import erasure_setup, select_components

    cfg = CompareConfig(erasure_k=(1,), guidance=2.5, judge="concept-world-clip", concepts=("red", "blue"))
    assert erasure_setup(sd_models["sd1"], select_components(sd_models["sd1"], cfg), cfg)["eval"].guidance == 2.5
    config = edit_concepts.EditConfig(attr_steps=5, guidance=1.5)
    edit_concepts.check_config(config)
    for bad, message in ((["--gen-steps", "0"], "--gen-steps and --max-batch >= 1"),
                         (["--guidance", "-1"], "--guidance must be a scale >= 0 (1: unguided), got -1.0")):
        assert message in refused(erasure_curves.main, bad)
    with pytest.raises(ValueError, match="--gen-steps"):
        CompareConfig(gen_steps=0)
    with pytest.raises(ValueError, match="--guidance"):
        edit_concepts.check_config(edit_concepts.EditConfig(guidance=-1.0))


@pytest.mark.parametrize("style", ["sd1", "sd2"])  # PNDM with epsilon prediction; DDIM with v-prediction
def test_the_evaluation_set_is_generated_within_max_batch(sd_models, style):
    """On Stable Diffusion the objective's evaluation images are generated (two UNet rows per image under guidance):
    in calls of at most max_batch rows, from the noise one call draws, so a deterministic sampler gives the same
    images up to rounding; the default, one call, is bitwise what generate gives."""
    from interp.core.generation import generate

    model = sd_models[style]  # both samplers deterministic
    concept = interp.text_concept("red")
    big = ObjectiveConfig(n_images=3, timesteps=(500,), gen_steps=2)
    one = Objective(model, concept, big)
    x0 = generate(model, one.target_prompts, seed=0, steps=2, decode=False).to(one.dtype)
    assert torch.equal(one.x_t, interp.core.diffusion.add_noise(model.scheduler, x0[one.image_index], one.noise, one.t))
    rows = []
    handle = model.unet.conv_in.register_forward_hook(lambda mod, args, out: rows.append(out.shape[0]))
    try:
        split = Objective(model, concept, ObjectiveConfig(**{**big.to_dict(), "max_batch": 2}))
    finally:
        handle.remove()
    assert rows and max(rows) <= 2, rows  # one image (2 rows) per call
    torch.testing.assert_close(split.x_t, one.x_t, rtol=1e-4, atol=1e-5)


def test_the_vae_decodes_in_slices_that_hold_what_a_unet_pass_does(sd_models):
    """A generation call's images are decoded in slices sized like a UNet pass of ``max_rows`` rows (one image's
    decoding at 64x64 latents holds about 6 UNet rows' activations; smaller latents, more images): the same images
    up to rounding, no slice above the bound."""
    from interp.core import diffusion

    model = sd_models["sd1"]  # 8x8 latents: 64 / 6 images per UNet row
    assert diffusion.decode_batch((1, 4, 64, 64), 12) == 2 and diffusion.decode_batch((1, 4, 8, 8), 1) == 10
    assert diffusion.decode_batch((1, 4, 64, 64), 1) == 1
    z = torch.randn(12, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []
    handle = model.vae.decoder.conv_in.register_forward_hook(lambda mod, args, out: seen.append(out.shape[0]))
    try:
        with torch.no_grad():
            whole = diffusion.decode(z, model.vae)
            sliced = diffusion.decode(z, model.vae, max_rows=1)
    finally:
        handle.remove()
    assert seen == [12, 10, 2]
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-6)
