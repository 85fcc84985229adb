"""The concept-world text-to-image model: real diffusers/transformers classes, small enough for a laptop CPU.

A pixel-space ``UNet2DConditionModel`` (16x16 RGB, three resolution levels; cross-attention transformer blocks at
8x8 and 4x4 in the down, mid and up paths: 7 transformer blocks, each with self-attention ``attn1``,
cross-attention ``attn2`` and a GEGLU feed-forward ``ff``), a 3-layer ``CLIPTextModel``, and a DDIM scheduler,
assembled as :class:`ConceptWorldPipeline`, a ``DiffusionPipeline`` that round-trips through
``save_pretrained``/``from_pretrained`` offline. There is no VAE: the UNet denoises pixels in [-1, 1], which is
what makes training from scratch fit in minutes on a CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from interp.core import diffusion
from interp.world.vocab import BOS, EOS, MAX_LENGTH, PAD, build_tokenizer, check_prompts, vocabulary


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the concept-world model. The defaults are the shipped model's."""

    image_size: int = 16
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    attention_heads: int = 4
    norm_num_groups: int = 8
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    text_intermediate: int = 128
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    # v-prediction (as Stable Diffusion 2.x): its loss weighs high-noise steps, where the global layout (background,
    # shape) is decided, by 1 + 1/SNR relative to epsilon-prediction, and low-noise steps as epsilon does. With
    # epsilon-prediction the first model ignored the background word entirely (see the README).
    prediction_type: str = "v_prediction"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def tiny(cls) -> "ModelConfig":
        """A few-thousand-parameter model of the same architecture, for tests that build models in milliseconds."""
        return cls(block_out_channels=(8, 16, 16), attention_heads=2, norm_num_groups=4, text_hidden=16,
                   text_layers=3, text_heads=2, text_intermediate=32)


def build_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=cfg.image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=cfg.block_out_channels,
        down_block_types=cfg.down_block_types,
        up_block_types=cfg.up_block_types,
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.attention_heads,  # diffusers reads this as the number of heads (legacy naming)
        norm_num_groups=cfg.norm_num_groups,
    )


def build_text_encoder(cfg: ModelConfig) -> CLIPTextModel:
    vocab = vocabulary()
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=cfg.text_hidden,
            intermediate_size=cfg.text_intermediate,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=vocab.index(BOS),
            eos_token_id=vocab.index(EOS),
            pad_token_id=vocab.index(PAD),
        )
    )


def train_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type)


def sample_scheduler(cfg: ModelConfig) -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


class ConceptWorldPipeline(DiffusionPipeline):
    """Text-to-image pipeline of the concept world (pixel space; classifier-free guidance available, trained with
    caption dropout, but the model samples best unguided, so ``guidance_scale`` defaults to 1)."""

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate images for ``prompt``; returns a float tensor (B, 3, H, W) in [0, 1]."""
        prompts = check_prompts(prompt, self.tokenizer.get_vocab())
        device, dtype = self.unet.device, self.unet.dtype  # once: diffusers walks every module for each
        cond = diffusion.encode_ids(self.text_encoder, diffusion.tokenize(self.tokenizer, prompts, device))
        uncond = diffusion.encode_ids(self.text_encoder, diffusion.tokenize(self.tokenizer, [""] * len(prompts), device))
        if latents is None:
            latents = diffusion.initial_noise(self.unet, len(prompts), generator, dtype, device)

        def unet_fn(x, t, context, step):
            return self.unet(x.to(dtype), t, encoder_hidden_states=context.to(dtype), return_dict=False)[0]

        out = diffusion.denoise(
            unet_fn, diffusion.fresh_scheduler(self.scheduler), latents, cond, uncond, num_inference_steps, guidance_scale, generator
        )
        return diffusion.decode(out)


def build_pipeline(cfg: ModelConfig | None = None, seed: int = 0) -> ConceptWorldPipeline:
    """A freshly initialized (untrained) concept-world pipeline."""
    cfg = cfg or ModelConfig()
    torch.manual_seed(seed)
    return ConceptWorldPipeline(
        unet=build_unet(cfg), text_encoder=build_text_encoder(cfg), tokenizer=build_tokenizer(),
        scheduler=sample_scheduler(cfg),
    )
