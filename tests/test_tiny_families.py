"""Tiny random pipelines of the newer families (SDXL, PixArt-α, SD3, FLUX): real diffusers / transformers classes,
saved and reloaded offline, generating; what each pipeline hands its denoiser at one step; seeded determinism; the
offline T5 tokenizer."""

from __future__ import annotations

import hashlib

import pytest
import torch

from interp.testing import (
    FAMILIES,
    WORDS,
    generation_kwargs,
    t5_tokenizer,
    tiny_flux,
    tiny_pipeline,
    tiny_pixart,
)

NEW = ("sdxl", "pixart", "sd3", "flux")
PROMPT = "a photo of a red circle"

PIPELINE = {"sdxl": "StableDiffusionXLPipeline", "pixart": "PixArtAlphaPipeline", "sd3": "StableDiffusion3Pipeline",
            "flux": "FluxPipeline"}
DENOISER = {"sdxl": "UNet2DConditionModel", "pixart": "PixArtTransformer2DModel", "sd3": "SD3Transformer2DModel",
            "flux": "FluxTransformer2DModel"}
#: Latents of a 64x64 image (FLUX's come back packed: 4x4 tokens of 2x2 patches x 16 channels).
LATENT = {"sdxl": (1, 4, 8, 8), "pixart": (1, 4, 8, 8), "sd3": (1, 16, 8, 8), "flux": (1, 16, 64)}


def load(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def generate(pipe, family, **kw):
    kw = {**generation_kwargs(family), "num_inference_steps": 2, "generator": torch.Generator().manual_seed(0),
          "output_type": "pt", **kw}
    return pipe(PROMPT, **kw).images


def record_calls(module):
    """Wrap ``module.forward``: every call's (args, kwargs, output) is appended to the returned list."""
    calls, forward = [], module.forward

    def wrapped(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    module.forward = wrapped
    return calls


def shapes(value):
    if torch.is_tensor(value):
        return tuple(value.shape)
    if isinstance(value, dict):
        return {k: shapes(v) for k, v in value.items()}
    return value


def weight_hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    # PixArt-α 1024 (sample_size 128): the variant with micro-conditions, whose default image is 1024 px
    return {family: tiny_pipeline(root / family, family, **({"sample_size": 128} if family == "pixart" else {}))
            for family in NEW}


def test_families_and_dispatcher(tmp_path):
    assert FAMILIES == ("sd1", "sd2", "sdxl", "pixart", "sd3", "flux")
    with pytest.raises(ValueError, match="family"):
        tiny_pipeline(tmp_path / "x", "sd4")
    pipe = load(tiny_pipeline(tmp_path / "sd2", "sd2"))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("family", NEW)
def test_reload_and_generate(folders, family):
    pipe = load(folders[family])
    assert type(pipe).__name__ == PIPELINE[family]
    assert type(denoiser(pipe)).__name__ == DENOISER[family]
    assert pipe.vae_scale_factor == 8
    image = generate(pipe, family)
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    assert 0 <= image.min() and image.max() <= 1
    latents = generate(pipe, family, output_type="latent")
    assert latents.shape == LATENT[family] and torch.isfinite(latents).all()
    # the same generator gives the same image
    assert torch.equal(generate(pipe, family), image)


@pytest.mark.parametrize("family", NEW)
def test_same_seed_same_weights(tmp_path, family):
    a = weight_hashes(tiny_pipeline(tmp_path / "a", family, seed=3))
    b = weight_hashes(tiny_pipeline(tmp_path / "b", family, seed=3))
    c = weight_hashes(tiny_pipeline(tmp_path / "c", family, seed=4))
    assert len(a) >= 3 and a == b
    assert all(a[k] != c[k] for k in a)


def test_family_structure(folders):
    sdxl, pixart, sd3, flux = (load(folders[f]) for f in NEW)
    # SDXL: two CLIP encoders, the second with a projection; the second tokenizer pads with "!"
    assert type(sdxl.text_encoder).__name__ == "CLIPTextModel"
    assert type(sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert sdxl.tokenizer.pad_token_id == sdxl.tokenizer.eos_token_id
    assert sdxl.tokenizer_2.pad_token == "!"
    cfg = sdxl.unet.config
    assert cfg.addition_embed_type == "text_time"
    assert cfg.cross_attention_dim == sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size
    assert cfg.projection_class_embeddings_input_dim == (6 * cfg.addition_time_embed_dim
                                                         + sdxl.text_encoder_2.config.projection_dim)
    assert type(sdxl.scheduler).__name__ == "EulerDiscreteScheduler"
    assert sdxl.scheduler.config.prediction_type == "epsilon"
    # PixArt-α 1024: learned sigma, micro-conditions, T5
    assert pixart.transformer.config.out_channels == 2 * pixart.transformer.config.in_channels
    assert pixart.transformer.config.sample_size == 128 and pixart.transformer.use_additional_conditions
    assert type(pixart.text_encoder).__name__ == "T5EncoderModel"
    assert type(pixart.scheduler).__name__ == "DPMSolverMultistepScheduler"
    # SD3: CLIP x2 with projections + T5, 16-channel VAE with a shift, flow matching with shift 3
    assert [type(e).__name__ for e in (sd3.text_encoder, sd3.text_encoder_2, sd3.text_encoder_3)] == [
        "CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"]
    assert sd3.vae.config.latent_channels == 16 and sd3.vae.config.shift_factor == 0.0609
    assert sd3.vae.config.scaling_factor == 1.5305
    assert type(sd3.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and sd3.scheduler.config.shift == 3.0
    # FLUX.1-dev: guidance embedding, dynamic shifting
    assert flux.transformer.config.guidance_embeds
    assert flux.vae.config.latent_channels == 16 and flux.transformer.config.in_channels == 64
    assert flux.scheduler.config.use_dynamic_shifting
    assert (flux.scheduler.config.base_shift, flux.scheduler.config.max_shift) == (0.5, 1.15)
    assert (flux.scheduler.config.base_image_seq_len, flux.scheduler.config.max_image_seq_len) == (256, 4096)


#: PixArtAlphaPipeline cannot run ONE step with a DPM-Solver scheduler (it indexes ``scheduler.step(...)[1]``, an
#: LCM-style denoised output), so every test here runs two steps.

#: What each pipeline hands its denoiser at one step of a 64x64 image of one prompt (CFG doubles the batch, except
#: for guidance-distilled FLUX). Positional arguments are listed as ``"arg0"``, ``"arg1"``.
EXPECTED_KWARGS = {
    "sdxl": {"arg0": (2, 4, 8, 8), "arg1": (), "encoder_hidden_states": (2, 16, 48), "timestep_cond": None,
             "cross_attention_kwargs": None, "added_cond_kwargs": {"text_embeds": (2, 16), "time_ids": (2, 6)},
             "return_dict": False},
    "pixart": {"arg0": (2, 4, 8, 8), "encoder_hidden_states": (2, 120, 32), "encoder_attention_mask": (2, 120),
               "timestep": (2,), "added_cond_kwargs": {"resolution": (2, 2), "aspect_ratio": (2, 1)},
               "return_dict": False},
    "sd3": {"hidden_states": (2, 16, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 16 + 256, 32),
            "pooled_projections": (2, 24), "joint_attention_kwargs": None, "return_dict": False},
    "flux": {"hidden_states": (1, 16, 64), "timestep": (1,), "guidance": (1,), "pooled_projections": (1, 16),
             "encoder_hidden_states": (1, 512, 32), "txt_ids": (512, 3), "img_ids": (16, 3),
             "joint_attention_kwargs": {}, "return_dict": False},
}


@pytest.mark.parametrize("family", NEW)
def test_denoiser_kwargs(folders, family):
    pipe = load(folders[family])
    calls = record_calls(denoiser(pipe))
    generate(pipe, family, output_type="latent")
    assert len(calls) == 2  # one call per step
    args, kwargs, out = calls[0]
    seen = {f"arg{i}": shapes(a) for i, a in enumerate(args)} | {k: shapes(v) for k, v in kwargs.items()}
    assert seen == EXPECTED_KWARGS[family]
    out = out[0]
    if family == "pixart":  # learned sigma: twice the latent channels
        assert out.shape == (2, 8, 8, 8)
        cond = kwargs["added_cond_kwargs"]
        assert cond["resolution"].tolist() == [[64.0, 64.0]] * 2 and cond["aspect_ratio"].tolist() == [[1.0]] * 2
        assert kwargs["encoder_attention_mask"][1].tolist() == [1] * 7 + [0] * 113  # 6 words + </s>
    elif family == "flux":
        assert out.shape == (1, 16, 64)
        assert kwargs["guidance"].tolist() == [3.5]  # the pipeline's default guidance_scale
        assert kwargs["img_ids"][:, 0].eq(0).all() and kwargs["txt_ids"].eq(0).all()
    else:
        assert out.shape == seen.get("hidden_states", seen.get("arg0"))


@pytest.mark.parametrize("family", ("sd3", "flux", "pixart"))
def test_max_sequence_length(folders, family):
    """The T5 text is padded / truncated to the pipeline's ``max_sequence_length``, whatever the tokenizer's
    ``model_max_length`` (16)."""
    pipe = load(folders[family])
    calls = record_calls(denoiser(pipe))
    generate(pipe, family, output_type="latent", max_sequence_length=24)
    kwargs = calls[0][1]
    clip_tokens = 16 if family == "sd3" else 0  # SD3 puts the CLIP states before T5's
    assert kwargs["encoder_hidden_states"].shape[1] == clip_tokens + 24
    if family == "flux":
        assert kwargs["txt_ids"].shape == (24, 3)


@pytest.mark.parametrize("family", ("pixart", "flux"))
def test_default_size_is_1024(folders, family):
    """PixArt-α 1024 (sample_size 128, binning) and FLUX (hard-coded default) generate 1024 px by default."""
    pipe = load(folders[family])
    image = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 1024, 1024) and torch.isfinite(image).all()


@pytest.mark.parametrize("family", ("sdxl", "sd3"))
def test_default_size_is_small(folders, family):
    pipe = load(folders[family])
    image = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 64, 64)


def test_flux_schnell(tmp_path):
    pipe = load(tiny_flux(tmp_path / "schnell", guidance_embeds=False))
    assert not pipe.transformer.config.guidance_embeds
    assert not pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift == 1.0
    calls = record_calls(pipe.transformer)
    image = generate(pipe, "flux")
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    assert calls[0][1]["guidance"] is None


def test_pixart_without_micro_conditions(tmp_path):
    """PixArt-α 256 (sample_size 32): no resolution / aspect-ratio conditions; binning onto the 256 bins."""
    pipe = load(tiny_pixart(tmp_path / "p256", sample_size=32))
    assert not pipe.transformer.use_additional_conditions
    calls = record_calls(pipe.transformer)
    image = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 256, 256)
    assert calls[0][1]["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    with pytest.raises(ValueError, match="sample_size"):
        tiny_pixart(tmp_path / "bad", sample_size=8)


def test_t5_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.model_max_length == 16
    ids = tok(PROMPT).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["▁a", "▁photo", "▁of", "▁a", "▁red", "▁circle", "</s>"]
    for w in WORDS:  # every word is one piece
        assert tok.convert_ids_to_tokens(tok(w).input_ids) == ["▁" + w, "</s>"]
    assert tok.convert_ids_to_tokens(tok("zebra").input_ids) == ["▁", "z", "e", "b", "r", "a", "</s>"]
    assert tok.decode(tok("A Red cat").input_ids, skip_special_tokens=True) == "A Red cat"
    padded = tok(PROMPT, padding="max_length", max_length=40, truncation=True)
    assert len(padded.input_ids) == 40 and sum(padded.attention_mask) == 7
    tok.save_pretrained(tmp_path / "t5")
    again = AutoTokenizer.from_pretrained(tmp_path / "t5")
    assert again(PROMPT).input_ids == ids and len(again) == len(tok)
