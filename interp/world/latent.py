"""The latent concept-world model ``concept-world-latent``: the concept world in Stable Diffusion's layout.

32x32 renders of the same world (:mod:`.render` scales its geometry by ``size / 16``), encoded by a diffusers
``AutoencoderKL`` (Kingma & Welling 2014; the KL-regularized autoencoder of Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models") to 8x8x4 latents (three encoder blocks, two downsamplings, as SD's
VAE has four blocks and three), a latent-space ``UNet2DConditionModel`` in SD's layout (cross-attention down blocks,
then a plain ``DownBlock2D`` at the lowest resolution, mirrored up blocks, two layers per block), a 6-layer
``CLIPTextModel`` over the same word-level tokenizer, and a v-prediction DDIM scheduler, assembled as a real
``StableDiffusionPipeline``: the suite loads it exactly as it loads a user's SD folder.

As in SD, latents are multiplied by ``vae.config.scaling_factor`` = 1 / std of the VAE's latents over a batch of
training renders, so the diffusion model sees unit-variance data; the VAE's loss is a reconstruction loss plus a KL
term weighted so lightly (SD: ~1e-6) that it only keeps the latent scale bounded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from .model import build_text_encoder
from .vocab import build_tokenizer


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of the latent model's autoencoder: ``image_size`` -> ``image_size / 2**(len(blocks) - 1)``."""

    image_size: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16

    def __post_init__(self):
        if self.image_size % 2 ** (len(self.block_out_channels) - 1):
            raise ValueError(f"image_size {self.image_size} is not divisible by the VAE's downsampling "
                             f"{2 ** (len(self.block_out_channels) - 1)}")

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class LatentModelConfig:
    """Architecture of ``concept-world-latent``. The defaults are the shipped model's.

    Field names shared with :class:`~interp.world.model.ModelConfig` (text encoder, schedule) mean the same thing.
    """

    vae: VAEConfig = field(default_factory=VAEConfig)
    # (48, 96, 96): 4.98 M UNet parameters, 3x the pixel model's; (64, 128, 128) would be 8.75 M but 21 MB shipped
    # in float16 and 1.4x slower per step (measured: 0.64 vs 0.89 s per fwd+bwd of batch 128, 2 threads)
    block_out_channels: tuple[int, ...] = (48, 96, 96)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    layers_per_block: int = 2
    attention_heads: int = 6
    norm_num_groups: int = 16
    text_hidden: int = 128
    text_layers: int = 6
    text_heads: int = 8
    text_intermediate: int = 256
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"

    @property
    def image_size(self) -> int:
        """The size of the images the model is trained on and generates (the trainer renders at this size)."""
        return self.vae.image_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def tiny(cls) -> "LatentModelConfig":
        """A small model of the same architecture, for tests that build and train it in seconds."""
        return cls(vae=VAEConfig(block_out_channels=(8, 8, 8), norm_num_groups=4), block_out_channels=(8, 16, 16),
                   attention_heads=2, norm_num_groups=4, text_hidden=16, text_layers=2, text_heads=2,
                   text_intermediate=32)


@dataclass(frozen=True)
class VAETrainConfig:
    """Training of the autoencoder (phase 1): fresh renders every step, L1 + ``kl_weight`` * KL."""

    # Probes (1 thread): 300 steps of batch 64 at lr 2e-3 reconstructed color at 52% (classifier), 1000 steps of batch
    # 32 at lr 3e-3 at 97.4% (purple on white read as blue, every other value 100%), loss still falling.
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    kl_weight: float = 1e-6
    mse_weight: float = 1.0  # L1 + MSE: L1 keeps edges sharp, MSE punishes the rare large colour error
    scale_batch: int = 512  # renders whose latents' std sets the scaling factor
    seed: int = 0
    log_every: int = 100
    save_every: int = 200

    def __post_init__(self):
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps} and {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def build_vae(cfg: VAEConfig) -> AutoencoderKL:
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups, sample_size=cfg.image_size,
    )


def build_latent_unet(cfg: LatentModelConfig) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=cfg.vae.latent_size,
        in_channels=cfg.vae.latent_channels,
        out_channels=cfg.vae.latent_channels,
        block_out_channels=cfg.block_out_channels,
        down_block_types=cfg.down_block_types,
        up_block_types=cfg.up_block_types,
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.attention_heads,  # diffusers reads this as the number of heads (legacy naming)
        norm_num_groups=cfg.norm_num_groups,
    )


def latent_scheduler(cfg: LatentModelConfig) -> DDIMScheduler:
    """The pixel model's DDIM sampler, except ``clip_sample=False`` (as SD's): latents are not bounded to [-1, 1]."""
    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


def build_latent_pipeline(cfg: LatentModelConfig | None = None, vae: AutoencoderKL | None = None,
                          seed: int = 0) -> StableDiffusionPipeline:
    """A freshly initialized UNet and text encoder around ``vae`` (a new one if None), as a StableDiffusionPipeline."""
    cfg = cfg or LatentModelConfig()
    torch.manual_seed(seed)
    vae = vae if vae is not None else build_vae(cfg.vae)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=build_text_encoder(cfg), tokenizer=build_tokenizer(), unet=build_latent_unet(cfg),
        scheduler=latent_scheduler(cfg), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def encode(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents of images in [0, 1]: a posterior sample with a generator (training), else its mean."""
    dist = vae.encode((images * 2 - 1).to(vae.dtype)).latent_dist
    z = dist.mean if generator is None else dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
    return z * vae.config.scaling_factor
