"""The diffusion-transformer concept-world model ``concept-world-dit``: the concept world in Stable Diffusion 3's layout.

A diffusers ``SD3Transformer2DModel`` (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution
Image Synthesis": an MMDiT whose blocks keep an image stream and a context stream with their own weights and attend
jointly over both), trained with flow matching (``x_t = (1 - sigma) x0 + sigma eps``, target ``eps - x0``, the
transformer told ``1000 sigma``; sigma drawn logit-normal as SD3's) on the latents of ``concept-world-latent``'s
shipped VAE (32x32x3 -> 8x8x4, frozen), conditioned by ``concept-world-latent``'s shipped frozen CLIP text tower,
assembled as a plain ``StableDiffusion3Pipeline`` with a ``FlowMatchEulerDiscreteScheduler``.

**Two CLIPs with projection, from one tower.** The SD3 pipeline takes two ``CLIPTextModelWithProjection`` encoders
(CLIP-L and CLIP-G) and reads each one's penultimate hidden states and projected pooled embedding (``text_embeds``).
The suite ships one text tower, a ``CLIPTextModel`` without its CLIP's projection head (the latent model reads only
its last hidden states). Both encoders here are that tower, unchanged, with an identity projection
(``projection_dim`` = hidden = 64, ``text_projection`` = I): ``text_embeds`` is the tower's own pooled output (the
final-layer-normed end-of-text token), nothing is trained or invented in the text path, and the pipeline's
contract holds. The transformer thus sees the tower's penultimate states twice side by side (128 features =
``joint_attention_dim``, no zero padding), then 16 zero rows where T5's states would be, and a 128-wide pooled
vector. The zero rows come from an all-zero T5 (:func:`zero_t5`): no T5 is trained, and diffusers conditions a
pipeline loaded without one on 256 zero rows (its ``max_sequence_length``), which the suite's SD3 family follows;
the zero T5's 16-token tokenizer makes the family condition on the 16 rows the transformer was trained on (plain
diffusers: pass ``max_sequence_length=16``).

The VAE is the latent model's, weights unchanged, with ``shift_factor`` 0 written into its config (SD3's pipeline
adds it when decoding; the latent model's config leaves it null).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from interp.core import diffusion
from interp.testing import t5_tokenizer
from interp.world import render
from interp.world.fitting import Recipe, fit
from interp.world.latent import encode
from interp.world.plugin import ASSETS
from interp.world.train import save_model
from interp.world.vocab import vocabulary

#: The shipped model whose VAE and text tower the DiT reuses (frozen).
BASE = "concept-world-latent"


@dataclass(frozen=True)
class DiTModelConfig:
    """Architecture of ``concept-world-dit``'s transformer and sampler. The defaults are the shipped model's."""

    image_size: int = 32
    latent_size: int = 8  # the shipped VAE downsamples 4x
    latent_channels: int = 4
    patch_size: int = 1  # 64 image tokens; patch 2 would leave a 4x4 grid for a 32-px image
    num_layers: int = 6
    num_heads: int = 4
    head_dim: int = 32
    qk_norm: str | None = "rms_norm"  # as SD3.5: keeps attention logits bounded at a high learning rate
    text_hidden: int = 64  # the shipped tower's width; two copies side by side are the joint_attention_dim
    shift: float = 1.0  # the sampler's timestep shift (SD3 uses 3 at 1024 px; low resolution needs none)

    def to_dict(self) -> dict:
        """The fields as a plain dict (what the training config hashes)."""
        return asdict(self)

    @property
    def inner_dim(self) -> int:
        """The width of both streams: heads x head dimension."""
        return self.num_heads * self.head_dim

    @classmethod
    def tiny(cls) -> "DiTModelConfig":
        """A small transformer of the same layout, for tests that train it in seconds."""
        return cls(num_layers=2, num_heads=2, head_dim=8)


@dataclass(frozen=True)
class DiTTrainConfig(Recipe):
    """Everything that determines a trained ``concept-world-dit`` (besides the reused VAE and text tower, whose
    weights' digest is recorded in ``train_config.json``)."""

    model: DiTModelConfig = field(default_factory=DiTModelConfig)
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    p_omit: float = 0.12
    # SD3's logit-normal sampling of sigma: sigmoid(N(mean, std)); "uniform": sigma ~ U(0, 1)
    timesteps: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    seed: int = 0
    log_every: int = 100
    save_every: int = 200

    def __post_init__(self):
        super().__post_init__()
        if self.timesteps not in ("logit_normal", "uniform"):
            raise ValueError(f"timesteps must be 'logit_normal' or 'uniform', got {self.timesteps!r}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")


def build_transformer(cfg: DiTModelConfig):
    """A freshly initialized ``SD3Transformer2DModel`` of ``cfg`` (call ``torch.manual_seed`` first to fix it)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=cfg.latent_size, patch_size=cfg.patch_size, in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, num_layers=cfg.num_layers, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads, joint_attention_dim=2 * cfg.text_hidden,
        caption_projection_dim=cfg.inner_dim, pooled_projection_dim=2 * cfg.text_hidden,
        pos_embed_max_size=cfg.latent_size // cfg.patch_size, qk_norm=cfg.qk_norm,
    )


def flow_scheduler(cfg: DiTModelConfig):
    """The sampler that ships: SD3's ``FlowMatchEulerDiscreteScheduler``, with ``cfg.shift``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)


def with_projection(tower):
    """A ``CLIPTextModel`` as a ``CLIPTextModelWithProjection`` with an identity projection: its ``text_embeds`` are
    the tower's pooled output, its hidden states the tower's (bitwise)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(**{**tower.config.to_dict(), "projection_dim": tower.config.hidden_size})
    config.architectures = ["CLIPTextModelWithProjection"]
    enc = CLIPTextModelWithProjection(config)
    enc.text_model.load_state_dict(tower.state_dict())  # transformers 5: CLIPTextModel is the bare tower
    with torch.no_grad():
        enc.text_projection.weight.copy_(torch.eye(tower.config.hidden_size))
    return enc.eval().requires_grad_(False)


def zero_t5(width: int, max_length: int):
    """SD3's third encoder slot, filled so that the transformer is conditioned exactly as trained: a T5 encoder
    (``T5EncoderModel``, one layer, every weight zero, so its output is exactly zero for every prompt) over a
    ``T5TokenizerFast`` of the world's words whose ``model_max_length`` is the CLIP tokenizer's (16).

    Why: without a T5 the suite's SD3 family (as diffusers' ``encode_prompt``) conditions on ``max_sequence_length``
    = 256 zero rows in T5's place; the transformer was trained on 16 (:func:`encode_captions`; 256 would make each
    training step 3.5x as expensive: 336 tokens instead of 96). With this encoder present, the family reads T5's
    length from its tokenizer (16) and conditions on 16 zero rows, as in training. Returns ``(encoder, tokenizer)``."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_tokenizer([w for w in vocabulary() if w.isalpha()], max_length=max_length)
    encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=8, num_layers=1, num_heads=1,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    with torch.no_grad():
        for p in encoder.parameters():
            p.zero_()
    return encoder.eval().requires_grad_(False), tokenizer


def base_parts(base: str | Path | None = None):
    """The reused frozen parts, float32: ``(vae, text tower, tokenizer, digest of their weights)``."""
    from diffusers import StableDiffusionPipeline

    folder = Path(base) if base is not None else ASSETS / BASE
    pipe = StableDiffusionPipeline.from_pretrained(folder / "pipeline", dtype=torch.float32, local_files_only=True)
    sha = hashlib.sha256()
    for part in ("vae", "text_encoder"):
        for name, value in sorted(getattr(pipe, part).state_dict().items()):
            sha.update(f"{part}.{name}".encode() + value.contiguous().numpy().tobytes())
    vae = pipe.vae.eval().requires_grad_(False)
    # the folder it came from, named relative to the assets (not this machine's path, which diffusers records)
    vae.register_to_config(shift_factor=0.0, _name_or_path=f"{BASE}/pipeline/vae")
    return vae, pipe.text_encoder, pipe.tokenizer, sha.hexdigest()[:16]


def build_dit_pipeline(cfg: DiTModelConfig | None = None, seed: int = 0, base: str | Path | None = None):
    """A freshly initialized transformer between the reused VAE and text tower, as a ``StableDiffusion3Pipeline``;
    also the digest of the reused weights."""
    import copy

    from diffusers import StableDiffusion3Pipeline

    cfg = cfg or DiTModelConfig()
    vae, tower, tokenizer, digest = base_parts(base)
    if tower.config.hidden_size != cfg.text_hidden:
        raise ValueError(f"the text tower is {tower.config.hidden_size} wide, the model config says {cfg.text_hidden}")
    torch.manual_seed(seed)
    transformer = build_transformer(cfg)
    encoder = with_projection(tower)
    t5, t5_tokenizer = zero_t5(2 * cfg.text_hidden, tokenizer.model_max_length)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=flow_scheduler(cfg), vae=vae,
        text_encoder=encoder, tokenizer=tokenizer, text_encoder_2=copy.deepcopy(encoder),
        tokenizer_2=copy.deepcopy(tokenizer), text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )
    return pipe, digest


def encode_captions(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own conditioning of ``captions``: ``(prompt_embeds, pooled_projections)``, with 16 zero rows
    from the all-zero T5 (:func:`zero_t5`), as the suite's SD3 family conditions (it reads T5's length from
    ``tokenizer_3``); diffusers' ``encode_prompt`` and ``__call__`` do so with ``max_sequence_length=16`` (their
    default, 256 rows, is not what the model was trained on)."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=pipe.tokenizer.model_max_length)
    return embeds, pooled


def sample_sigmas(cfg: DiTTrainConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """Training noise levels: logit-normal (SD3: sigmoid of a normal draw) or uniform."""
    if cfg.timesteps == "uniform":
        return torch.rand(n, generator=generator)
    return torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))


def flow_loss(pipe, cfg: DiTTrainConfig, images: torch.Tensor, captions: list[str],
              generator: torch.Generator) -> torch.Tensor:
    """Per-sample flow-matching loss on clean images in [0, 1], through the suite's own definitions
    (:func:`interp.core.diffusion.add_noise` / :func:`~interp.core.diffusion.denoising_target`)."""

    with torch.no_grad():
        x0 = encode(pipe.vae, images, generator)  # a posterior sample, as SD's training encodes
    noise = torch.randn(x0.shape, generator=generator)
    t = sample_sigmas(cfg, len(x0), generator) * 1000
    xt = diffusion.add_noise(pipe.scheduler, x0, noise, t)
    target = diffusion.denoising_target(pipe.scheduler, x0, noise, t)
    embeds, pooled = encode_captions(pipe, captions)
    pred = pipe.transformer(hidden_states=xt, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t,
                            return_dict=False)[0]
    return F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))


def train_dit(cfg: DiTTrainConfig, out_dir: str | Path, progress: bool = True, base: str | Path | None = None):
    """Train ``concept-world-dit``; resumes from ``out_dir/train_state.pt`` when it was written for ``cfg``.

    Fresh renders every step, encoded by the frozen VAE and captioned (10% dropped for classifier-free guidance),
    AdamW with warmup and cosine decay, clipped gradients, EMA of the transformer (the shipped weights, rounded to
    float16). Returns ``(pipeline in float32, history, records)``.
    """
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe, digest = build_dit_pipeline(cfg.model, seed=cfg.seed, base=base)
    pipe.transformer.train()
    params = list(pipe.transformer.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup, cfg.steps)
    ema = EMAModel(params, decay=cfg.ema_decay)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    parts = {"transformer": pipe.transformer, "opt": opt, "sched": sched, "ema": ema}

    def batch_loss(step):
        images, captions, _ = render.render_batch(rng, cfg.batch_size, cfg.model.image_size, p_omit=cfg.p_omit)
        drop = rng.random(len(captions)) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop)]
        return flow_loss(pipe, cfg, images, captions, gen).mean()

    history, seconds = fit(batch_loss, cfg, params, opt, sched, out_dir / "train_state.pt", cfg.hash(), parts, rng,
                           gen, "transformer", progress, ema=ema)
    ema.copy_to(params)
    for p in params:  # the shipped model is the float16-rounded EMA model, evaluated in float32
        p.data = p.data.half().float()
    pipe.transformer.eval()
    records = {"base": BASE, "base_weights_digest": digest, "transformer_seconds": seconds,
               "parameters": {k: sum(p.numel() for p in getattr(pipe, k).parameters())
                              for k in ("transformer", "vae", "text_encoder", "text_encoder_2")}}
    return pipe, history, records


def save_dit(pipe, out_dir: str | Path, cfg: DiTTrainConfig, history: list[dict], records: dict) -> Path:
    """Write the pipeline (float16 safetensors, a plain ``StableDiffusion3Pipeline`` folder in ``pipeline/``) and
    ``train_config.json`` (with ``records``), as :func:`.train.save_model` does for the other world models."""

    return save_model(pipe, out_dir, cfg, history, extra=records)
