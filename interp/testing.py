"""Tiny random text-to-image pipelines of the real diffusers / transformers classes, for tests and tutorials:
Stable Diffusion 1.x / 2.x, SDXL, PixArt-α, SD3 and FLUX.

No weights can be downloaded in a test, so each family's code path is exercised on pipelines built from configs,
saved with ``save_pretrained`` and loaded back (``DiffusionPipeline.from_pretrained(folder, local_files_only=True)``,
or :func:`interp.load_model`) exactly as a user's folder is. Every builder seeds torch first, so the same call writes
bitwise identical weights.

For Stable Diffusion, two styles (:func:`tiny_stable_diffusion`) cover the differences that matter between 1.x
and 2.x:

``"sd1"``
    Stable Diffusion 1.x: conv projections in the transformer blocks, one head dimension for every block, epsilon
    prediction, the PNDM scheduler SD 1.4/1.5 ship (``skip_prk_steps``), and a byte-pair ``CLIPTokenizer`` whose pad
    token is the end-of-text token.
``"sd2"``
    Stable Diffusion 2.x: linear projections, per-block head dimensions, upcast attention, v-prediction with DDIM,
    and a tokenizer that pads with ``!`` (a token distinct from end-of-text), as SD 2's does.

Any diffusers scheduler class can be swapped in (``scheduler="EulerDiscreteScheduler"``); it is built from the
style's scheduler config, the way a user swaps one into a real pipeline.

The newer families (:func:`tiny_pipeline` builds any of :data:`FAMILIES`) keep each real model's structure: its
pipeline, denoiser, text encoders, tokenizers, latent channels, VAE scaling and scheduler config, at hidden sizes of
8-32 with 1-2 layers. Their VAEs have four levels, so ``vae_scale_factor`` is 8 as in the real models (an 8x8 latent
is a 64x64 image).

``"sdxl"``
    Stable Diffusion XL: ``StableDiffusionXLPipeline`` with a ``UNet2DConditionModel`` conditioned on the
    concatenated penultimate hidden states of two CLIP text encoders (``CLIPTextModel`` +
    ``CLIPTextModelWithProjection``) and on ``added_cond_kwargs`` (``text_embeds``: the second encoder's pooled
    projection; ``time_ids``: the six size/crop micro-conditions); the second tokenizer pads with ``!``; Euler
    (epsilon, ``leading`` spacing) as SDXL base ships.
``"pixart"``
    PixArt-α 1024: ``PixArtAlphaPipeline`` with a ``PixArtTransformer2DModel`` (DiT with adaLN-single, cross
    attention to T5, learned sigma: ``out_channels = 2 * in_channels``) whose config ``sample_size`` is 128, which
    is what makes the pipeline pass the ``resolution`` / ``aspect_ratio`` micro-conditions, and also what sets its
    default image to 1024 px with resolution binning; pass ``height``, ``width`` and ``use_resolution_binning=False``
    for a small image (:func:`generation_kwargs`). A T5 encoder, DPM-Solver++ on linear betas as PixArt ships (with
    which the pipeline cannot run a single step: it reads an LCM-style second output of ``scheduler.step``).
``"sd3"``
    Stable Diffusion 3 (medium): ``StableDiffusion3Pipeline`` with an ``SD3Transformer2DModel`` (MMDiT, joint
    attention over image patches and text tokens), two ``CLIPTextModelWithProjection`` + a ``T5EncoderModel`` (the
    CLIP states are zero-padded to T5's width and put before T5's tokens; the pooled CLIP projections are
    concatenated into ``pooled_projections``), a 16-channel VAE with SD3's ``scaling_factor`` / ``shift_factor``, and
    rectified flow (``FlowMatchEulerDiscreteScheduler``, ``shift=3.0``).
``"flux"``
    FLUX.1-dev: ``FluxPipeline`` with a ``FluxTransformer2DModel`` (double- and single-stream blocks, rotary position
    ids ``txt_ids`` / ``img_ids``), latents packed into 2x2 patches (tokens of 64 = 16 x 4 channels), a guidance
    embedding (guidance distilled: one branch, no classifier-free batch), CLIP (pooled) + T5, a 16-channel VAE with
    FLUX's factors, and flow matching with resolution-dependent (dynamic) shift. ``guidance_embeds=False`` builds a
    FLUX.1-schnell-like model instead (no guidance embedding, static ``shift=1.0``). The pipeline's default image is
    always 1024 px (``default_sample_size`` is hard-coded to 128 latents); pass ``height`` / ``width``.

Tokenizers are built offline. CLIP's is the byte-pair one above; T5's (:func:`t5_tokenizer`) is a
``T5TokenizerFast`` around a ``tokenizers`` Unigram model with T5's ids (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), a
Metaspace pre-tokenizer and every :data:`WORDS` entry as a whole ``▁word`` piece (any other word is spelled with
single-letter pieces). T5 has relative positions only, so the pipelines' ``max_sequence_length`` (PixArt 120, SD3
256, FLUX 512 by default) works at any value: the T5 text is padded to exactly that many tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

#: The schedulers a Stable Diffusion pipeline ships or a user typically swaps in.
SCHEDULERS = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
    "HeunDiscreteScheduler",
)

#: Words the tiny tokenizer assembles whole (every other word is spelled letter by letter, as CLIP does for rare
#: words); enough for the concept words and templates the tests and notebooks use.
WORDS = ("a", "an", "photo", "image", "picture", "painting", "rendering", "drawing", "of", "van", "gogh", "style", "cat",
         "dog", "in", "the", "red", "blue", "green", "circle", "square", "striped", "on", "black", "white")


def write_clip_vocab(folder: str | Path, words: Sequence[str] = WORDS) -> None:
    """``vocab.json`` + ``merges.txt`` of a CLIP BPE tokenizer that knows every letter (and ``!``) and assembles
    ``words`` whole."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in "abcdefghijklmnopqrstuvwxyz!":
            vocab[ch + suffix] = len(vocab)
    merges: list[tuple[str, str]] = []
    for w in words:  # merge left to right: c+a -> ca, ca+t</w> -> cat</w>
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        prefix = parts[0]
        for p in parts[1:]:
            merged = prefix + p
            if (prefix, p) not in merges:
                merges.append((prefix, p))
            vocab.setdefault(merged, len(vocab))
            prefix = merged
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def clip_tokenizer(folder: str | Path, style: str = "sd1", max_length: int = 16):
    from transformers import CLIPTokenizer

    folder = Path(folder)
    write_clip_vocab(folder)
    pad = "<|endoftext|>" if style == "sd1" else "!"
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                         pad_token=pad)


def scheduler_config(style: str) -> dict:
    """Stable Diffusion's training schedule (scaled-linear betas), with the family's prediction type."""
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "steps_offset": 1, "prediction_type": "epsilon" if style == "sd1" else "v_prediction"}


def make_scheduler(name: str, style: str = "sd1"):
    """A diffusers scheduler by class name, configured as the style's pipeline would be."""
    import diffusers

    if name not in SCHEDULERS and not hasattr(diffusers, name):
        raise ValueError(f"unknown scheduler {name!r}; try one of {SCHEDULERS}")
    cls = getattr(diffusers, name)
    cfg = scheduler_config(style)
    if name == "PNDMScheduler":
        cfg["skip_prk_steps"] = True
    if name == "DDIMScheduler":
        cfg.update(clip_sample=False, set_alpha_to_one=False)
    return cls.from_config(cfg)


def tiny_stable_diffusion(folder: str | Path, style: str = "sd1", scheduler: str | None = None, seed: int = 0,
                          sample_size: int = 8) -> Path:
    """Build a tiny random SD pipeline of the real classes, ``save_pretrained`` it into ``folder``; return it."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if style not in ("sd1", "sd2"):
        raise ValueError(f"style must be 'sd1' or 'sd2', got {style!r}")
    folder = Path(folder)
    scheduler = scheduler or ("PNDMScheduler" if style == "sd1" else "DDIMScheduler")
    tokenizer = clip_tokenizer(folder.parent / f".{folder.name}-vocab", style)
    torch.manual_seed(seed)
    sd2 = style == "sd2"
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4) if sd2 else 4, use_linear_projection=sd2, upcast_attention=sd2,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=0, eos_token_id=1,
        pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, sample_size=2 * sample_size,
    )
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_scheduler(scheduler, style), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Newer families: SDXL, PixArt-α, SD3, FLUX.

#: Every family :func:`tiny_pipeline` builds.
FAMILIES = ("sd1", "sd2", "sdxl", "pixart", "sd3", "flux")

#: Characters the tiny T5 tokenizer knows as single pieces (anything else becomes ``<unk>``).
T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"


def t5_tokenizer(words: Sequence[str] = WORDS, max_length: int = 16):
    """A ``T5TokenizerFast`` built offline: a Unigram model with T5's special ids (``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2), ``▁word`` pieces for ``words`` and single-character pieces for :data:`T5_CHARS`, T5's Metaspace
    pre-tokenizer and ``$A </s>`` post-processor, no sentinel (``<extra_id_*>``) tokens.

    ``max_length`` only sets ``model_max_length``: the pipelines pad and truncate the T5 text to their own
    ``max_sequence_length``, which may be larger (T5 has no absolute positions)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in dict.fromkeys(words)]
    vocab += [(c, -6.0) for c in T5_CHARS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, extra_ids=0, model_max_length=max_length)


def _t5_encoder(tokenizer, d_model: int = 32):
    """A 2-layer T5 v1.1-style encoder (gated GELU, untied embeddings) over ``tokenizer``'s vocabulary."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=d_model // 8,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def _clip_encoder(tokenizer, hidden_size: int, projection_dim: int | None = None, hidden_act: str = "quick_gelu"):
    """A 2-layer CLIP text encoder over ``tokenizer`` (``CLIPTextModelWithProjection`` when ``projection_dim``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=max(hidden_size // 8, 1), max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim or hidden_size, hidden_act=hidden_act, bos_token_id=0, eos_token_id=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(cfg) if projection_dim else CLIPTextModel(cfg)


def _vae(latent_channels: int = 4, **config):
    """A four-level ``AutoencoderKL`` (``vae_scale_factor`` 8, as every real family's), 8-16 channels wide."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, **config,
    )


def _clip_tokenizers(folder: Path, pads: Sequence[str]):
    """One CLIP tokenizer per style in ``pads`` ("sd1" pads with end-of-text, "sd2" with ``!``); the shared vocab is
    written beside ``folder`` (as :func:`tiny_stable_diffusion` does)."""
    vocab = folder.parent / f".{folder.name}-vocab"
    return [clip_tokenizer(vocab, style) for style in pads]


def tiny_sdxl(folder: str | Path, seed: int = 0, sample_size: int = 8) -> Path:
    """Tiny random Stable Diffusion XL (``StableDiffusionXLPipeline``), saved into ``folder``; returns it.

    UNet on 4-channel ``sample_size`` latents with ``addition_embed_type="text_time"``; cross attention over the
    concatenated penultimate states of CLIP-L-like (``CLIPTextModel``, 16 wide) and CLIP-G-like
    (``CLIPTextModelWithProjection``, 32 wide, projection 16) encoders, so ``cross_attention_dim`` = 48 and
    ``projection_class_embeddings_input_dim`` = 16 + 6 time ids x ``addition_time_embed_dim`` 8 = 64."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    folder = Path(folder)
    tokenizer, tokenizer_2 = _clip_tokenizers(folder, ("sd1", "sd2"))
    torch.manual_seed(seed)
    text_encoder = _clip_encoder(tokenizer, 16)
    text_encoder_2 = _clip_encoder(tokenizer_2, 32, projection_dim=16, hidden_act="gelu")
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
        norm_num_groups=8,
    )
    vae = _vae(4, sample_size=8 * sample_size, scaling_factor=0.13025, force_upcast=True)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", interpolation_type="linear", timestep_spacing="leading", steps_offset=1,
        use_karras_sigmas=False,
    )
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.save_pretrained(folder)
    return folder


def tiny_pixart(folder: str | Path, seed: int = 0, sample_size: int = 32) -> Path:
    """Tiny random PixArt-α (``PixArtAlphaPipeline``), saved into ``folder``; returns it.

    ``sample_size`` is the transformer's config value, which the pipeline reads as the model's native resolution:
    128 is PixArt-α 1024 (micro-conditions ``resolution`` / ``aspect_ratio`` used, 1024 px default image
    with resolution binning), 64 / 32 (the default, the fastest) are PixArt-α 512 / 256 (no micro-conditions). Generate small images with
    :func:`generation_kwargs`. The transformer (2 layers, 3 heads x 8 = 24 wide, patch 2) predicts learned sigma
    (8 output channels for 4 latent channels), cross-attends to a 32-wide T5 encoder."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    if sample_size not in (32, 64, 128):
        raise ValueError(f"PixArt-α's pipeline only knows sample_size 32, 64 or 128, got {sample_size}")
    folder = Path(folder)
    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _t5_encoder(tokenizer)
    transformer = PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        in_channels=4, out_channels=8, cross_attention_dim=24, caption_channels=text_encoder.config.d_model,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    )
    vae = _vae(4, sample_size=8 * sample_size, scaling_factor=0.18215)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        lower_order_final=True, timestep_spacing="linspace", steps_offset=0,
    )
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder


def tiny_sd3(folder: str | Path, seed: int = 0, sample_size: int = 8) -> Path:
    """Tiny random Stable Diffusion 3 (``StableDiffusion3Pipeline``), saved into ``folder``; returns it.

    MMDiT (2 joint blocks, 2 heads x 8 = 16 wide, patch 2, position embeddings for up to 3 x ``sample_size``
    latents a side, as SD3's 192 patches are 3 x its 64) on 16-channel latents; CLIP-L-like (8 wide) and
    CLIP-G-like (16 wide) ``CLIPTextModelWithProjection`` whose penultimate states (8 + 16 = 24 wide) are
    zero-padded to the 32-wide T5 encoder's width; pooled projections 8 + 16 = 24."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    folder = Path(folder)
    tokenizer, tokenizer_2 = _clip_tokenizers(folder, ("sd1", "sd2"))
    tokenizer_3 = t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _clip_encoder(tokenizer, 8, projection_dim=8)
    text_encoder_2 = _clip_encoder(tokenizer_2, 16, projection_dim=16, hidden_act="gelu")
    text_encoder_3 = _t5_encoder(tokenizer_3)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=text_encoder_3.config.d_model, caption_projection_dim=16,
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        pos_embed_max_size=3 * sample_size // 2,
    )
    vae = _vae(16, sample_size=8 * sample_size, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                    tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(folder)
    return folder


def tiny_flux(folder: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Tiny random FLUX.1 (``FluxPipeline``), saved into ``folder``; returns it.

    ``guidance_embeds=True``: FLUX.1-dev (guidance embedding, dynamic shift); ``False``: FLUX.1-schnell (no guidance
    embedding, static ``shift=1.0``). Transformer: 1 double-stream + 2 single-stream blocks, 2 heads x 16 = 32 wide,
    rotary axes (4, 4, 8), on packed 2x2 patches of 16-channel latents (64 input channels); a 16-wide
    ``CLIPTextModel`` gives the pooled projection, a 32-wide T5 the text tokens. The pipeline's default image is
    1024 px whatever the config; pass ``height`` / ``width`` (multiples of 16)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    folder = Path(folder)
    (tokenizer,) = _clip_tokenizers(folder, ("sd1",))
    tokenizer_2 = t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _clip_encoder(tokenizer, 16)
    text_encoder_2 = _t5_encoder(tokenizer_2)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=text_encoder_2.config.d_model, pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    )
    # FLUX's transformer has no sample size (its pipeline defaults to 1024 px, 128 latents); the suite reads one
    # recorded in the config, so the tiny model works on 8x8 latents (64 px)
    transformer.register_to_config(sample_size=8)
    vae = _vae(16, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
               use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0 if guidance_embeds else 1.0, use_dynamic_shifting=guidance_embeds,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def tiny_pipeline(folder: str | Path, family: str = "sd1", **kw) -> Path:
    """Build the tiny random pipeline of ``family`` (one of :data:`FAMILIES`) into ``folder``; return it.

    Keywords go to the family's builder: ``seed`` for all; ``sample_size`` for sd1/sd2/sdxl/sd3 (latent side) and
    pixart (32/64/128); ``scheduler`` for sd1/sd2; ``guidance_embeds`` for flux."""
    if family in ("sd1", "sd2"):
        return tiny_stable_diffusion(folder, style=family, **kw)
    builders = {"sdxl": tiny_sdxl, "pixart": tiny_pixart, "sd3": tiny_sd3, "flux": tiny_flux}
    if family not in builders:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return builders[family](folder, **kw)


def generation_kwargs(family: str, latent_size: int = 8) -> dict:
    """Keyword arguments that make a tiny ``family`` pipeline generate a ``latent_size`` latent (a small image)
    instead of its default size: ``height`` / ``width`` in pixels, and for PixArt ``use_resolution_binning=False``
    (binning would map any size onto PixArt's 1024-px bins) and ``clean_caption=False`` (the default ``True``
    lower-cases and rewrites the prompt when ``ftfy`` and ``beautifulsoup4`` are installed, and warns on every call
    when they are not). sd1/sd2 VAEs downsample 2x, the others 8x; FLUX packs 2x2 latent patches, so its
    ``latent_size`` must be even."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    px = latent_size * (2 if family in ("sd1", "sd2") else 8)
    kw = {"height": px, "width": px}
    if family == "pixart":
        kw.update(use_resolution_binning=False, clean_caption=False)
    return kw
