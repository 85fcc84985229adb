"""SDXL, PixArt-α, SD3 and FLUX: tiny random pipelines of the real diffusers classes, saved with save_pretrained and
loaded as a user's folder, through every part of the suite (interp.core.families)."""

from __future__ import annotations

import copy
import json
import types

import pandas as pd
import pytest
import scipy.stats
import torch

import interp
from interp import testing
from interp.core import diffusion
from interp.core.families import family_of
from interp.core.generation import generate
from interp.methods import REGISTRY

FAMILIES = ("sdxl", "pixart", "sd3", "flux")
pytestmark = pytest.mark.xdist_group("families")

#: The component families each denoiser and its text encoders expose (README, "Your own model").
EXPECTED = {
    "sdxl": {"attn1", "attn2", "ff", "block", "resnet", "text_attn", "text_mlp", "text_layer"},
    "pixart": {"attn1", "attn2", "ff", "block", "text_attn", "text_mlp", "text_layer"},
    "sd3": {"attn", "attn_context", "ff", "ff_context", "block", "text_attn", "text_mlp", "text_layer"},
    "flux": {"attn", "attn_context", "ff", "ff_context", "block", "single_block", "single_attn", "single_mlp",
             "text_attn", "text_mlp", "text_layer"},
}
TEXT_PARTS = {"sdxl": ["text_encoder", "text_encoder_2"], "pixart": ["text_encoder"],
              "sd3": ["text_encoder", "text_encoder_2", "text_encoder_3"], "flux": ["text_encoder", "text_encoder_2"]}
SMALL = interp.ObjectiveConfig(n_images=2, timesteps=(300, 700), gen_steps=2)


@pytest.mark.parametrize("fam", FAMILIES)
def test_family_components_and_addresses(tiny_family_models, fam):
    m = tiny_family_models[fam]
    assert m.family.name == fam
    assert m.text_parts == TEXT_PARTS[fam]
    assert set(m.space.families()) == EXPECTED[fam]
    prefix = "unet." if fam == "sdxl" else "transformer."
    for g in ("layer", "neuron", "head"):
        comps = m.components(g)
        assert len(comps) > 0
        assert {c.address.split(".", 1)[0] for c in comps} == set(TEXT_PARTS[fam]) | {prefix[:-1]}
    for part in TEXT_PARTS[fam]:  # every encoder's layers are components, labelled apart
        assert len(m.components("layer", family="text_layer", model=part)) == 2
    labels = m.space.layers()
    assert len(labels) == len(set(labels))
    c = m.space.parse(str(m.components("neuron", family="ff")[3]))
    assert c.granularity == "neuron" and c.index == 3


@pytest.fixture(scope="module")
def pixart_1024(tmp_path_factory):
    """PixArt-α 1024 (sample_size 128): micro-conditions (resolution, aspect ratio) on 128x128 latents."""
    return interp.load_model(str(testing.tiny_pixart(tmp_path_factory.mktemp("p1024") / "p", sample_size=128)),
                             device="cpu")


@pytest.mark.parametrize("fam", FAMILIES + ("pixart-1024",))
def test_sampling_equals_the_pipelines_own(tiny_family_models, pixart_1024, fam):
    """The suite's loop on the family's conditioning gives the pipeline's own latents for the same noise: the
    prompts are encoded, packed and passed as the pipeline does (pooled embeddings, time ids, masks, FLUX's packing,
    ids and guidance embedding, flow-matching schedules)."""
    m = pixart_1024 if fam == "pixart-1024" else tiny_family_models[fam]
    assert (fam == "pixart-1024") == (fam.startswith("pixart") and m.denoiser.use_additional_conditions)
    _assert_samples_as_its_pipeline(m)


def _assert_samples_as_its_pipeline(m):
    """Three steps from the same noise through the suite (``generate``) and through the pipeline's own ``__call__``
    give the same final latents, to 1e-5 of their scale."""
    noise = diffusion.initial_noise(m, 1, torch.Generator().manual_seed(0))
    ours = generate(m, ["a red circle"], seed=0, steps=3, decode=False)
    H, W = noise.shape[-2:]
    latents = noise
    packed = m.family.name == "flux"  # the pipeline takes its latents packed in 2x2 patches
    if packed:
        ctx = interp.core.interventions.encode_prompts(m, m.tokenize([""]))
        latents = m.family.denoiser_inputs(m, noise, torch.zeros(1), ctx, None)["hidden_states"]
    out = m.pipeline("a red circle", num_inference_steps=3, guidance_scale=m.default_guidance, latents=latents,
                     output_type="latent", height=H * m.vae_scale_factor, width=W * m.vae_scale_factor,
                     **m.family.pipeline_kwargs(m)).images
    if packed:
        out = m.family.prediction(m, out, noise)
    assert out.shape == ours.shape
    assert float((ours - out.float()).abs().max()) <= 1e-5 * float(out.abs().max()), m.name


def _mixed(m, fam):
    """Text layers of every encoder, two denoiser layers and feed-forward neurons: what every method accepts."""
    text = [c for part in TEXT_PARTS[fam] for c in m.components("layer", family="text_layer", model=part)[:1]]
    blocks = list(m.components("layer", family="block"))[:2]
    neurons = list(m.components("neuron", family="ff"))[:3]
    return interp.ComponentSet(text + blocks + neurons)


OPTIONS = {"coar": {"n_masks": 24}, "maskgrad": {"n_masks": 4}, "ig": {"steps": 4}, "tracing": {"n_noise": 1}}


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_on_every_family(tiny_family_models, fam, method):
    m = tiny_family_models[fam]
    comps = _mixed(m, fam)
    before = m.state_fingerprint()
    df = interp.attribute(method, m, "red", comps, objective=SMALL, **OPTIONS.get(method, {}))
    after = m.state_fingerprint()
    assert all(torch.equal(before[k], after[k]) for k in before), "the method changed the model's weights"
    main = df[df["variant"] == method] if "variant" in df else df
    assert list(main["component"]) == comps.addresses
    assert main["score"].notna().all() and torch.isfinite(torch.tensor(main["score"].to_numpy())).all()
    assert (main["method"] == method).all()


@pytest.mark.parametrize("fam", FAMILIES)
def test_cad_agrees_with_true_ablation_on_a_planted_model(tiny_family_folders, fam):
    """Eight output neurons of the last feed-forward layer, each scaled to a different small size so that their
    effects are spread and first order: CAD's w·dJ/dw must rank them as exact ablation does (float64 ground truth)."""
    m = interp.load_model(str(tiny_family_folders[fam]), device="cpu")
    comps = m.components("neuron", kind="ff.net.2")
    last = comps[-1].module
    comps = interp.ComponentSet([c for c in comps if c.module == last][:8])
    with torch.no_grad():
        w = m.module(last).weight
        for j, c in enumerate(comps):
            w[c.index] *= 0.05 * (j + 1)
    # one objective for both methods: each would otherwise make its own float64 copy of the model
    oc = interp.Objective(m, "red", interp.ObjectiveConfig(n_images=2, timesteps=(300, 700), dtype="float64"))
    true = interp.attribute("ablation", m, "red", comps, objective=oc)["score"]
    cad = interp.attribute("cad", m, "red", comps, objective=oc)["score"]
    assert true.abs().max() > 0
    assert scipy.stats.spearmanr(true, cad)[0] > 0.9


def test_an_unknown_denoiser_is_refused_by_name():
    pipe = types.SimpleNamespace(transformer=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"the denoiser Linear of SimpleNamespace is not a family the suite knows"):
        family_of(pipe)
    with pytest.raises(ValueError, match="neither a unet nor a transformer"):
        family_of(types.SimpleNamespace())


@pytest.mark.parametrize("fam", FAMILIES)
def test_compare_methods_runs_on_every_family(tiny_family_folders, tmp_path, fam, no_figures):
    """The whole comparison on each family: its tables (figures are placeholders: no assertion looks at them)."""
    from analyses import compare_methods

    out = tmp_path / "run"
    block = {"sdxl": "down_blocks.1"}.get(fam, "transformer_blocks")
    argv = ["--model", str(tiny_family_folders[fam]), "--concepts", "red", "--blocks", block, "--images", "2",
            "--timesteps", "300", "700", "--heldout-masks", "12", "--coar-masks", "48", "--tracing-noise", "1",
            "--lds-alphas", "0.05", "0.2", "--n-boot", "100", "--no-progress", "--threads", "1", "--out", str(out)]
    assert compare_methods.main(argv) == 0
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    results = pd.read_parquet(out / "results.parquet")
    assert set(results["method"]) >= {"ablation", "cad", "coar", "maskgrad", "tracing"}
    assert results["component"].str.startswith("unet." if fam == "sdxl" else "transformer.").all()
    corr = pd.read_csv(out / "tables" / "correlations.csv")
    assert corr["spearman"].notna().any()


@pytest.mark.parametrize("fam", FAMILIES)
def test_closed_form_edits_act_where_each_family_reads_the_text(tiny_family_models, fam, monkeypatch):
    """UCE edits the projections that read the text (cross-attention K/V; SD3's and FLUX's joint blocks' context
    K/V), Diff-QuickFix every text encoder's layer-0 attention output; a family UCE does not know is refused by
    name (tests/test_edit_families.py runs both edits on every family)."""
    import importlib
    import re

    from interp.studies.editing.edits import quickfix_module_paths

    uce = importlib.import_module("interp.studies.editing.uce")
    m = tiny_family_models[fam]
    kinds = {p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 1)[-1] for p in uce.cross_attention_projections(m)}
    assert kinds == ({"attn.add_k_proj", "attn.add_v_proj"} if fam in ("sd3", "flux") else {"attn2.to_k", "attn2.to_v"})
    assert [p.split(".", 1)[0] for p in quickfix_module_paths(m)] == TEXT_PARTS[fam]
    monkeypatch.setattr(uce, "READERS", {k: v for k, v in uce.READERS.items() if k != fam})
    label = re.escape(m.family.label)
    with pytest.raises(ValueError, match=f"UCE does not know through which projections the {label} denoiser"):
        uce.cross_attention_projections(m)


def test_flow_matching_noising_and_target_are_the_papers():
    """x_t = (1 - sigma) x0 + sigma eps with sigma = t / 1000, and the velocity target eps - x0 (SD3, FLUX)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([0, 250, 999])
    s = torch.tensor([0.0, 0.25, 0.999]).reshape(3, 1, 1, 1)
    assert diffusion.noise_model(sched) == "flow"
    torch.testing.assert_close(diffusion.add_noise(sched, x0, eps, t), (1 - s) * x0 + s * eps)
    torch.testing.assert_close(diffusion.denoising_target(sched, x0, eps, t), eps - x0)


@pytest.mark.parametrize("fam", FAMILIES)
def test_plan_on_every_family_and_on_the_meta_device(tiny_family_models, tiny_family_folders, fam, capsys):
    """`compare_methods --plan` measures a family's passes; the same model moved to the meta device (a published
    architecture without weights) is planned with the same counts and FLOPs, and says that it ran nothing."""
    from analyses import compare_methods
    from interp.core.models import DiffusionModel
    from interp.studies.compare_config import CompareConfig
    from interp.studies.plan import plan_comparison

    block = "mid_block" if fam == "sdxl" else "transformer_blocks"
    argv = ["--model", str(tiny_family_folders[fam]), "--concepts", "red", "--blocks", block, "--images", "2",
            "--timesteps", "300", "700", "--methods", "ablation", "cad", "--lds-alphas", "0.05", "--threads", "1",
            "--plan"]
    assert compare_methods.main(argv) == 0
    assert "measured forward pass" in capsys.readouterr().out
    m = tiny_family_models[fam]
    cfg = CompareConfig(model=str(tiny_family_folders[fam]), concepts=("red",), blocks=(block,),
                        methods=("ablation", "cad"), n_images=2, timesteps=(300, 700), lds_alphas=(0.05,))
    real = plan_comparison(cfg, model=m)
    texts = {p: copy.deepcopy(t).to("meta") for p, t in m.text_encoders.items()}
    meta = DiffusionModel(m.name, torch.nn.Module.to(copy.deepcopy(m.unet), "meta"), texts[m.text_parts[0]],
                          m.tokenizer, m.scheduler, None, family=m.family, pipeline=m.pipeline, text_encoders=texts,
                          tokenizers=m.tokenizers)
    planned = plan_comparison(cfg, model=meta)
    pd.testing.assert_series_equal(planned.table["unet_rows"], real.table["unet_rows"])
    assert planned.passes["flops_per_row"] == real.passes["flops_per_row"] > 0
    assert planned.passes["grad_bytes_per_row"] > 0 and planned.table["seconds"].isna().all()
    assert "counted on the meta device" in planned.format()


@pytest.mark.parametrize("fam", ("sd3", "flux"))
def test_tracing_through_generation_restores_both_streams_within_max_batch(tiny_family_models, fam):
    """Causal tracing under the classifier objective patches both streams of a joint block at every step ("path#1"
    keys for the second), built per generation call: the scores within --max-batch 2 are those of one big call."""
    m = tiny_family_models[fam]
    red = interp.text_concept("red", alternatives=("blue", "green"), n=2)
    comps = m.components("layer", family="block")
    out = []
    for mb in (2, 256):
        cfg = interp.ObjectiveConfig(kind="classifier", judge="concept-world-clip", n_images=2, gen_steps=2, max_batch=mb)
        out.append(interp.attribute("tracing", m, red, comps, objective=cfg, n_noise=1)["score"].to_numpy())
    assert len(out[0]) == len(comps)
    torch.testing.assert_close(torch.tensor(out[0]), torch.tensor(out[1]), rtol=0, atol=5e-5)


def _variant(folder, tmp, name):
    """Other pipelines of the same families, assembled from a tiny folder's parts as a user's checkpoints are: SD3
    loaded without its T5 (``text_encoder_3=None``), PixArt-Σ's pipeline around PixArt's parts."""
    import diffusers

    out = tmp / name
    if name == "sd3-no-t5":
        p = diffusers.StableDiffusion3Pipeline.from_pretrained(folder)
        pipe = diffusers.StableDiffusion3Pipeline(**{**p.components, "text_encoder_3": None, "tokenizer_3": None})
    else:
        p = diffusers.PixArtAlphaPipeline.from_pretrained(folder)
        pipe = diffusers.PixArtSigmaPipeline(tokenizer=p.tokenizer, text_encoder=p.text_encoder, vae=p.vae,
                                             transformer=p.transformer, scheduler=p.scheduler)
    pipe.save_pretrained(out)
    return out


@pytest.mark.parametrize("name", ["sd3-no-t5", "pixart-sigma", "flux-schnell"])
def test_other_checkpoints_of_the_families_sample_as_their_pipelines(tiny_family_folders, tmp_path, name):
    """SD3 without T5 (diffusers conditions on zeros in its place), PixArt-Σ (300 T5 tokens) and FLUX.1-schnell (no
    guidance embedding, static shift): the suite's sampling equals each pipeline's own."""
    if name == "flux-schnell":
        folder = testing.tiny_flux(tmp_path / name, guidance_embeds=False)
    else:
        folder = _variant(tiny_family_folders[name.split("-")[0]], tmp_path, name)
    m = interp.load_model(str(folder), device="cpu")
    if name == "pixart-sigma":
        assert m.encoders[0].length == min(300, m.tokenizer.model_max_length)
    if name == "sd3-no-t5":
        assert m.text_parts == ["text_encoder", "text_encoder_2"]
    _assert_samples_as_its_pipeline(m)
