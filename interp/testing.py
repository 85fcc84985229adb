"""Tiny random Stable Diffusion pipelines of the real diffusers / transformers classes, for tests and tutorials.

No weights can be downloaded in a test, so the Stable Diffusion code path is exercised on pipelines built from
configs, saved with ``save_pretrained`` and loaded back through :func:`interp.load_model` exactly as a user's folder
is. Two styles cover the differences that matter between the families:

``"sd1"``
    Stable Diffusion 1.x: conv projections in the transformer blocks, one head dimension for every block, epsilon
    prediction, the PNDM scheduler SD 1.4/1.5 ship (``skip_prk_steps``), and a byte-pair ``CLIPTokenizer`` whose pad
    token is the end-of-text token.
``"sd2"``
    Stable Diffusion 2.x: linear projections, per-block head dimensions, upcast attention, v-prediction with DDIM,
    and a tokenizer that pads with ``!`` (a token distinct from end-of-text), as SD 2's does.

Any diffusers scheduler class can be swapped in (``scheduler="EulerDiscreteScheduler"``); it is built from the
style's scheduler config, the way a user swaps one into a real pipeline.
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
