"""Training the concept-world model and its concept classifier from scratch, seeded and resumable.

The diffusion model learns v-prediction (Salimans & Ho 2022, as Stable Diffusion 2.x) on freshly rendered images
every step (the renderer is the data set), with 10% caption dropout for classifier-free guidance, AdamW with warmup
and cosine decay, and an EMA of the weights that becomes the shipped model. A first model trained with
epsilon-prediction and Min-SNR-5 weighting learned color but ignored the background word entirely and left speckle
noise: epsilon's loss carries little signal at the high-noise steps where the global layout is decided, and
Min-SNR down-weights the low-noise steps that remove the last noise. v-prediction weighs both. A training state is written every ``save_every`` steps, so an interrupted run resumes
where it stopped. The shipped weights are stored in float16 (halving the repository's size) and always loaded and
evaluated in float32; the fidelity written next to them is measured on exactly those rounded weights.

The latent model (:mod:`.latent`, ``concept-world-latent``; :func:`train_latent`) trains in three phases, all
resumable: a CLIP (:mod:`.clip`'s recipe, its text tower 6 layers deep) whose text tower becomes the frozen text
encoder, its autoencoder (:func:`train_vae`, whose scaling factor is then set as Stable Diffusion's was, 1 / std
of the latents of a batch of training renders), then the UNet by the same :func:`train` loop, on fresh 32x32 renders
encoded every step by the frozen, float16-rounded VAE (a posterior sample, as SD's training encodes), conditioned
by that frozen, float16-rounded text tower, as SD's UNet is by CLIP ViT-L/14's. Every phase runs one optimization
loop, :func:`.fitting.fit`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr

from interp.core import diffusion
from interp.core.judges import CLIPJudge, shipped_judges
from interp.core.store import config_hash
from interp.world.clip import (
    CLIPTrainConfig,
    heldout_renders,
    train_clip,
    world_templates,
    zero_shot_accuracy,
)
from interp.world.fitting import Recipe, fit
from interp.world.latent import LatentModelConfig, build_latent_pipeline, build_vae, encode
from interp.world.model import ModelConfig, build_pipeline, build_text_encoder, train_scheduler
from interp.world.render import render_batch


@dataclass(frozen=True)
class TrainConfig(Recipe):
    """Everything that determines a trained concept-world model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 3600
    batch_size: int = 128
    lr: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    p_omit: float = 0.12
    min_snr_gamma: float = 0.0  # 0: the plain loss of the prediction type
    seed: int = 0
    log_every: int = 100
    save_every: int = 250

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")


@dataclass(frozen=True)
class VAETrainConfig(Recipe):
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


@dataclass(frozen=True)
class LatentTrainConfig(TrainConfig):
    """Everything that determines a trained ``concept-world-latent``: the CLIP its frozen text encoder comes from
    (``text``; None: the text encoder is trained jointly with the UNet instead), its VAE's training, then its UNet's."""

    model: LatentModelConfig = field(default_factory=LatentModelConfig)
    vae: VAETrainConfig = field(default_factory=VAETrainConfig)
    # As Stable Diffusion's is OpenAI's CLIP ViT-L/14's, the text encoder is the text tower of a CLIP, frozen: one
    # trained first by the suite's CLIP recipe with a 6-layer text tower (a CLIPTrainConfig: phase 0), or a
    # pretrained one (a shipped judge's name such as ``concept-world-clip``, or a CLIPModel folder). Trained jointly
    # with the UNet instead (None), a 6-layer encoder barely told shapes apart and guidance could not make up for it.
    text: CLIPTrainConfig | str | None = field(default_factory=lambda: CLIPTrainConfig(text_layers=6))
    # batch 64: 1.9x the updates of batch 128 in the same time, which this model needed more than larger batches
    steps: int = 2000
    batch_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.text, CLIPTrainConfig):
            t, m = self.text, self.model
            have = (t.hidden, t.text_layers or t.layers, t.heads, t.intermediate)
            want = (m.text_hidden, m.text_layers, m.text_heads, m.text_intermediate)
            if have != want:
                raise ValueError(f"the CLIP to train has text (hidden, layers, heads, intermediate) {have}, the model "
                                 f"config asks for {want}: make CLIPTrainConfig's fields match LatentModelConfig's")


def diffusion_loss(pipe, noise_sched, images, captions, generator, min_snr_gamma=0.0) -> torch.Tensor:
    """Per-sample loss of the scheduler's prediction type (epsilon or v) on clean images in [0, 1]; a pipeline
    with a VAE learns its scaled latents."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        x0 = images * 2 - 1
    else:
        with torch.no_grad():
            x0 = encode(vae, images, generator)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(x0),), generator=generator)
    xt = noise_sched.add_noise(x0, noise, t)
    ctx = diffusion.encode_ids(pipe.text_encoder, diffusion.tokenize(pipe.tokenizer, captions))
    eps = pipe.unet(xt, t, encoder_hidden_states=ctx, return_dict=False)[0]
    v = noise_sched.config.prediction_type == "v_prediction"
    target = noise_sched.get_velocity(x0, noise, t) if v else noise
    loss = F.mse_loss(eps, target, reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma > 0:  # Min-SNR-gamma (Hang et al. 2023), in its epsilon or v form
        snr = compute_snr(noise_sched, t)
        loss = loss * torch.clamp(snr, max=min_snr_gamma) / (snr + 1 if v else snr)
    return loss


def _params(pipe):
    """What the diffusion phase trains: the UNet, and the text encoder unless it is frozen (pretrained)."""
    return [p for part in (pipe.unet, pipe.text_encoder) for p in part.parameters() if p.requires_grad]


def train(cfg: TrainConfig, out_dir: str | Path, progress: bool = True, pipe=None):
    """Train a concept-world pipeline; resumes from ``out_dir/train_state.pt`` when it matches ``cfg``.

    ``pipe``: the freshly initialized pipeline to train (default: the pixel model of ``cfg.model``); if it has a
    VAE (the latent model), the VAE stays frozen and encodes every batch; a text encoder whose parameters do not
    require grad (pretrained) stays frozen too. Returns ``(pipeline with EMA weights in
    float32, history)``, ``history`` being a list of ``{"step", "loss", "seconds"}`` records.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = pipe if pipe is not None else build_pipeline(cfg.model, seed=cfg.seed)
    if getattr(pipe, "vae", None) is not None:
        pipe.vae.eval().requires_grad_(False)
    pipe.unet.train()
    frozen_text = not any(p.requires_grad for p in pipe.text_encoder.parameters())
    pipe.text_encoder.train(not frozen_text)
    noise_sched = train_scheduler(cfg.model)
    params = _params(pipe)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup, cfg.steps)
    ema = EMAModel(params, decay=cfg.ema_decay)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "opt": opt, "sched": sched, "ema": ema}

    def batch_loss(step):
        images, captions, _ = render_batch(rng, cfg.batch_size, cfg.model.image_size, p_omit=cfg.p_omit)
        drop = rng.random(len(captions)) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop)]
        return diffusion_loss(pipe, noise_sched, images, captions, gen, cfg.min_snr_gamma).mean()

    history, _ = fit(batch_loss, cfg, params, opt, sched, out_dir / "train_state.pt", cfg.hash(), parts, rng, gen,
                      "train", progress, ema=ema)
    ema.copy_to(params)
    # The shipped model is the float16-rounded EMA model, evaluated in float32.
    for p in params:
        p.data = p.data.half().float()
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return pipe, history


def save_model(pipe, out_dir: str | Path, cfg: TrainConfig, history: list[dict], extra: dict | None = None) -> Path:
    """Write the pipeline (float16 safetensors) and ``train_config.json`` (with ``extra`` records) into ``out_dir``."""
    out_dir = Path(out_dir)
    pipe.to(torch.float16).save_pretrained(out_dir / "pipeline", safe_serialization=True)
    pipe.to(torch.float32)
    record = {
        "config": cfg.to_dict(), "config_hash": cfg.hash(), "history": history,
        "seconds": history[-1]["seconds"] if history else None,
        "threads": torch.get_num_threads(), "torch": torch.__version__, **(extra or {}),
    }
    (out_dir / "train_config.json").write_text(json.dumps(record, indent=1))
    state = out_dir / "train_state.pt"
    if state.exists():
        state.unlink()
    return out_dir


def _kl(dist) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per image, summed over latent elements (as diffusers' ``DiagonalGaussianDistribution``)."""
    return 0.5 * (dist.mean.pow(2) + dist.var - 1.0 - dist.logvar).sum(dim=(1, 2, 3))


def train_vae(cfg: VAETrainConfig, model_cfg: LatentModelConfig, out_dir: str | Path, progress: bool = True):
    """Phase 1 of the latent model: train its ``AutoencoderKL`` on fresh renders; resumable from
    ``out_dir/vae_state.pt``. The result is float16-rounded (what ships) and its ``scaling_factor`` set to 1 / std of
    the latent means of ``cfg.scale_batch`` training renders. Returns ``(vae in float32, history, seconds)``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    vae = build_vae(model_cfg.vae, model_cfg.image_size)
    vae.train()
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup, cfg.steps)
    rng = np.random.default_rng([cfg.seed, 1])  # not the UNet phase's stream
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    key = config_hash([cfg.to_dict(), model_cfg.vae.__dict__, model_cfg.image_size])
    state_path = out_dir / "vae_state.pt"
    parts = {"vae": vae, "opt": opt, "sched": sched}

    def batch_loss(step):
        images, _, _ = render_batch(rng, cfg.batch_size, model_cfg.image_size)
        x = images * 2 - 1
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)).sample
        return (F.l1_loss(rec, x) + cfg.mse_weight * F.mse_loss(rec, x)
                + cfg.kl_weight * _kl(dist).mean() / x[0].numel())  # KL per pixel value, as the reconstruction

    history, seconds = fit(batch_loss, cfg, params, opt, sched, state_path, key, parts, rng, gen, "vae", progress,
                            mark_done=True)
    vae.eval().requires_grad_(False)
    for p in vae.parameters():  # the UNet learns the latents of exactly the VAE that ships (float16-rounded)
        p.data = p.data.half().float()
    with torch.no_grad():
        images, _, _ = render_batch(np.random.default_rng([cfg.seed, 2]), cfg.scale_batch, model_cfg.image_size)
        z = vae.encode(images * 2 - 1).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae, history, seconds


def _text_tower(clip, model_cfg: LatentModelConfig, what: str):
    """``clip``'s text tower as a frozen, float16-rounded float32 ``CLIPTextModel`` of ``model_cfg``'s text
    dimensions (the UNet learns the contexts of the encoder that ships), and the digest of its weights."""

    tc = clip.config.text_config
    want = (model_cfg.text_hidden, model_cfg.text_layers, model_cfg.text_heads, model_cfg.text_intermediate)
    have = (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.intermediate_size)
    if want != have:
        raise ValueError(f"text encoder {what} has (hidden, layers, heads, intermediate) {have}, the model config "
                         f"asks for {want}: set LatentModelConfig's text_* fields to the CLIP's")
    encoder = build_text_encoder(model_cfg)
    encoder.load_state_dict(clip.text_model.state_dict())
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(p.half().float())
    sha = hashlib.sha256()
    for name, value in sorted(encoder.state_dict().items()):
        sha.update(name.encode() + value.contiguous().numpy().tobytes())
    return encoder.eval().requires_grad_(False), sha.hexdigest()[:16]


def pretrained_text_encoder(spec: str, model_cfg: LatentModelConfig):
    """The text tower of the CLIP ``spec`` (a shipped judge's name such as ``concept-world-clip``, or a CLIPModel
    folder) as a frozen float32 ``CLIPTextModel`` of ``model_cfg``'s text dimensions, float16-rounded, and the
    digest of its weights."""
    from transformers import CLIPModel

    folder = Path(shipped_judges().get(spec, spec))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"text encoder {spec!r}: no CLIPModel folder at {folder}; give a CLIPModel folder or "
                                f"build the suite's with `python -m analyses.train_clip`")
    clip = CLIPModel.from_pretrained(folder, local_files_only=True).float()
    return _text_tower(clip, model_cfg, repr(spec))


def trained_text_encoder(cfg: CLIPTrainConfig, model_cfg: LatentModelConfig, out_dir: str | Path,
                         progress: bool = True, heldout: int = 2000):
    """Phase 0 of the latent model: train a CLIP by the suite's recipe (:func:`.clip.train_clip`, resumable from
    ``out_dir/clip_state.pt``) and keep its text tower, as :func:`pretrained_text_encoder` does. Returns
    ``(encoder, digest, record)``, the record holding the CLIP's history, seconds and zero-shot accuracy on
    ``heldout`` held-out renders (its text tower is what reads the captions)."""

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clip, tokenizer, history = train_clip(cfg, progress=progress, state_path=out_dir / "clip_state.pt")
    judge = CLIPJudge(clip, tokenizer, templates=world_templates(), image_mean=[0.5] * 3, image_std=[0.5] * 3)
    images, truth = heldout_renders(heldout, seed=cfg.seed)
    record = {"clip_history": history, "clip_seconds": history[-1]["seconds"],
              "zero_shot_heldout": {"accuracy": zero_shot_accuracy(judge, images, truth), "n_images": heldout}}
    encoder, digest = _text_tower(clip, model_cfg, "(phase 0 CLIP)")
    return encoder, digest, record


def train_latent(cfg: LatentTrainConfig, out_dir: str | Path, progress: bool = True, clip_heldout: int = 2000):
    """Train ``concept-world-latent``, every phase resumable from its state in ``out_dir``: the CLIP whose text tower
    is the frozen text encoder (when ``cfg.text`` is a :class:`CLIPTrainConfig`; a name or folder: that CLIP's is
    taken; None: none, the text encoder is trained jointly with the UNet), the VAE, then the UNet on the VAE's
    latents. Returns ``(pipeline in float32, UNet-phase history, records)``; ``records`` holds the text encoder's
    origin (and the phase-0 CLIP's history, seconds and zero-shot accuracy on ``clip_heldout`` held-out renders),
    the VAE phase's history and seconds and the scaling factor."""
    records = {}
    if isinstance(cfg.text, CLIPTrainConfig):
        encoder, digest, clip_record = trained_text_encoder(cfg.text, cfg.model, out_dir, progress=progress,
                                                            heldout=clip_heldout)
        records["text_encoder"] = {"clip": "trained (phase 0)", "weights_digest": digest, **clip_record}
    elif cfg.text is not None:
        encoder, digest = pretrained_text_encoder(cfg.text, cfg.model)
        records["text_encoder"] = {"clip": cfg.text, "weights_digest": digest}
    vae, vae_history, vae_seconds = train_vae(cfg.vae, cfg.model, out_dir, progress=progress)
    records.update(vae_history=vae_history, vae_seconds=vae_seconds, scaling_factor=vae.config.scaling_factor)
    pipe = build_latent_pipeline(cfg.model, vae=vae, seed=cfg.seed)
    if cfg.text is not None:
        pipe.text_encoder.load_state_dict(encoder.state_dict())
        pipe.text_encoder.requires_grad_(False)
    pipe, history = train(cfg, out_dir, progress=progress, pipe=pipe)
    records["unet_seconds"] = history[-1]["seconds"]
    return pipe, history, records
