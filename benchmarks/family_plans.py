"""The cost of a modest comparison on each model family at its published size, counted without its weights.

SDXL's, SD3-medium's and FLUX.1's weights do not fit this machine in float32 (FLUX.1's transformer alone is 12 B
parameters), so each architecture is built from its published configuration on PyTorch's ``meta`` device (shapes, no
memory, no compute) and planned by the suite's own ``--plan`` code (:func:`interp.studies.plan.plan_comparison`): the
passes every method runs, their FLOPs, the weights' bytes and the activations a gradient row keeps. Time needs the
weights
on a GPU: run ``--plan`` there.

    python benchmarks/family_plans.py                       # every family, the comparison below
    python benchmarks/family_plans.py --families flux --dtype bfloat16

The comparison: one concept, the feed-forward output neurons of one block in the middle of the denoiser (1,152 to
3,072 of them), true ablation, CAD,
the mask-averaged gradient and the midpoint estimator, the default evaluation set (4 images x 2 timesteps, erase
objective with a shared anchor) and 256 held-out masks at two ablation rates. Tokenizers are small offline ones
(interp.testing) padded to the published lengths (CLIP 77, T5 as each pipeline encodes it), so the text encoders
run at their real size.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch

#: Published architectures (diffusers/transformers configs of the hub checkpoints named in the docs).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
FAMILIES = ("sd15", "sdxl", "pixart", "sd3", "flux")
#: The one layer whose feed-forward output neurons the comparison attributes: a block in the middle of the denoiser.
LAYER = {"sd15": "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2",
         "sdxl": "unet.mid_block.attentions.0.transformer_blocks.4.ff.net.2",
         "pixart": "transformer.transformer_blocks.14.ff.net.2", "sd3": "transformer.transformer_blocks.12.ff.net.2",
         "flux": "transformer.transformer_blocks.9.ff.net.2"}


def _clip(cfg, tokenizer, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    c = CLIPTextConfig(**cfg, bos_token_id=0, eos_token_id=1, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(c)


def _t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**T5_XXL))


def _vae(latent_channels: int, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=2,
                         block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, **kw)


def build(family: str, tmp: Path, dtype: torch.dtype = torch.float16):
    """The family's published architecture on the meta device, as an :class:`interp.core.models.DiffusionModel`."""
    import diffusers

    from interp.core.families import FAMILIES as ROWS
    from interp.core.models import DiffusionModel
    from interp.testing import clip_tokenizer, t5_tokenizer

    clip1 = clip_tokenizer(tmp / "clip1", "sd1", max_length=77)
    clip2 = clip_tokenizer(tmp / "clip2", "sd2", max_length=77)
    t5 = t5_tokenizer(max_length=512)
    with torch.device("meta"):
        if family in ("sd15", "sdxl"):
            sdxl = family == "sdxl"
            unet = diffusers.UNet2DConditionModel(
                sample_size=128 if sdxl else 64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280) if sdxl else (320, 640, 1280, 1280),
                down_block_types=(("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D") if sdxl else
                                  ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)),
                up_block_types=(("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D") if sdxl else
                                ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
                cross_attention_dim=2048 if sdxl else 768, attention_head_dim=(5, 10, 20) if sdxl else 8,
                transformer_layers_per_block=(1, 2, 10) if sdxl else 1, use_linear_projection=sdxl,
                **(dict(addition_embed_type="text_time", addition_time_embed_dim=256,
                        projection_class_embeddings_input_dim=2816) if sdxl else {}))
            texts = {"text_encoder": _clip(CLIP_L, clip1, False)}
            toks = {"text_encoder": clip1}
            if sdxl:
                texts["text_encoder_2"], toks["text_encoder_2"] = _clip(CLIP_G, clip2, True), clip2
            vae, row = _vae(4), ROWS["sdxl" if sdxl else "sd"]
            sched = ("EulerDiscreteScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                    steps_offset=1))
        elif family == "pixart":
            unet = diffusers.PixArtTransformer2DModel(
                sample_size=128, num_layers=28, attention_head_dim=72, num_attention_heads=16, patch_size=2,
                in_channels=4, out_channels=8, cross_attention_dim=1152, caption_channels=4096, attention_bias=True,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6)
            texts, toks = {"text_encoder": _t5()}, {"text_encoder": t5}
            vae, sched = _vae(4), ("DPMSolverMultistepScheduler", {})
            row = ROWS["pixart"]
        elif family == "sd3":
            unet = diffusers.SD3Transformer2DModel(
                sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
            texts = {"text_encoder": _clip(CLIP_L, clip1, True), "text_encoder_2": _clip(CLIP_G, clip2, True),
                     "text_encoder_3": _t5()}
            toks = {"text_encoder": clip1, "text_encoder_2": clip2, "text_encoder_3": t5}
            vae = _vae(16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
            sched, row = ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)), ROWS["sd3"]
        elif family == "flux":
            unet = diffusers.FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
                axes_dims_rope=(16, 56, 56))
            texts = {"text_encoder": _clip(CLIP_L, clip1, False), "text_encoder_2": _t5()}
            toks = {"text_encoder": clip1, "text_encoder_2": t5}
            vae = _vae(16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
            sched, row = ("FlowMatchEulerDiscreteScheduler", dict(shift=1.0)), ROWS["flux"]
        else:
            raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    sched = getattr(diffusers, sched[0])(**sched[1])  # a scheduler's tables are real tensors: built off the meta device
    for m in (unet, vae, *texts.values()):
        torch.nn.Module.to(m, dtype)
    first = next(iter(texts))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DiffusionModel(f"{family} (published size, meta)", unet, texts[first], toks[first], sched, vae,
                              family=row, text_encoders=texts, tokenizers=toks)


def plan(family: str, dtype: str = "float16"):
    from interp.studies.compare_config import CompareConfig
    from interp.studies.plan import plan_comparison

    with tempfile.TemporaryDirectory() as tmp:
        model = build(family, Path(tmp), getattr(torch, dtype))
        units = model.module(LAYER[family]).out_features
        cfg = CompareConfig(model=family, concepts=("Van Gogh style",),
                            components=tuple(f"{LAYER[family]}[{i}]" for i in range(units)), methods=("ablation", "cad", "maskgrad", "midpoint"), heldout_masks=256,
                            lds_alphas=(0.05, 0.2), dtype=dtype)
        return plan_comparison(cfg, model=model)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    args = p.parse_args(argv)
    for family in args.families:
        print(f"== {family}")
        print(plan(family, args.dtype).format())
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
