"""A random-weight pipeline of Stable Diffusion 1.5's published architecture, saved like a user's checkpoint folder.

UNet2DConditionModel (block channels 320/640/1280/1280, two layers per block, cross-attention dimension 768,
attention head dim 8: ~860 M parameters, 16 transformer blocks), CLIPTextModel (ViT-L/14's text tower: 12 layers,
hidden 768, 12 heads, 77 positions, 49,408 embeddings), AutoencoderKL (128/256/512/512, 4 latent channels, scaling
0.18215) and PNDMScheduler with ``skip_prk_steps`` (as SD 1.4/1.5 ship), assembled as a
``StableDiffusionPipeline`` and written with ``save_pretrained``; nothing is downloaded. The tokenizer is a real
``CLIPTokenizer`` built from a locally written ``vocab.json``/``merges.txt`` with a small vocabulary (single
characters plus whole-word merges for the words below), so prompts tokenize as they would in SD, word by word.

``sample_size`` is the UNet's default latent side: 64 is SD 1.5's (512x512 images); the architecture accepts any
multiple of 8, and the slow test uses 16 to keep a comparison within minutes on a CPU.

    python benchmarks/sd15_sized.py /tmp/sd15-64 --sample-size 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: Words the tokenizer merges into single tokens (prompt templates of interp.core.concepts and a few concepts).
WORDS = ("a", "an", "photo", "image", "picture", "painting", "of", "red", "blue", "green", "circle", "square",
         "striped", "dog", "cat", "style", "van", "gogh", "on", "black", "white")


def write_clip_vocab(folder: Path, words=WORDS) -> None:
    """``vocab.json`` and ``merges.txt`` of a byte-pair tokenizer that knows every letter and merges ``words``."""
    vocab = {"!": 0}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,'-":
        vocab.setdefault(ch, len(vocab))
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,'-":
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        prefix = parts[0]
        for p in parts[1:]:
            if (prefix, p) not in merges:
                merges.append((prefix, p))
            prefix = prefix + p
            vocab.setdefault(prefix, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def build_sd15_sized(folder: str | Path, sample_size: int = 64, seed: int = 0) -> Path:
    """Build the pipeline with random weights (seeded) and save it to ``folder``; returns the folder."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    if sample_size % 8:
        raise ValueError(f"sample_size must be a multiple of 8 (three downsamplings), got {sample_size}")
    tok_dir = folder.parent / f"{folder.name}-tokenizer-files"
    write_clip_vocab(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=sample_size * 8, scaling_factor=0.18215,
    )
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False, num_train_timesteps=1000)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--sample-size", type=int, default=64, help="UNet latent side (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    build_sd15_sized(args.folder, args.sample_size, args.seed)
    print(args.folder.resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
