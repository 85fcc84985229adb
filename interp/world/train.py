"""Training the concept-world model and its concept classifier from scratch, seeded and resumable.

The diffusion model learns v-prediction (Salimans & Ho 2022, as Stable Diffusion 2.x) on freshly rendered images
every step (the renderer is the data set), with 10% caption dropout for classifier-free guidance, AdamW with warmup
and cosine decay, and an EMA of the weights that becomes the shipped model. A first model trained with
epsilon-prediction and Min-SNR-5 weighting learned color but ignored the background word entirely and left speckle
noise: epsilon's loss carries little signal at the high-noise steps where the global layout is decided, and
Min-SNR down-weights the low-noise steps that remove the last noise. v-prediction weighs both. A training state is written every ``save_every`` steps, so an interrupted run resumes
where it stopped. The shipped weights are stored in float16 (halving the repository's size) and always loaded and
evaluated in float32; the fidelity written next to them is measured on exactly those rounded weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from .. import diffusion
from .model import ModelConfig, build_pipeline, train_scheduler
from .render import render_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
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
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps} and {self.batch_size}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def diffusion_loss(pipe, noise_sched, images, captions, generator, min_snr_gamma=0.0) -> torch.Tensor:
    """Per-sample loss of the scheduler's prediction type (epsilon or v) on clean images in [0, 1]."""
    x0 = images * 2 - 1
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
    return list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())


def train(cfg: TrainConfig, out_dir: str | Path, progress: bool = True):
    """Train a concept-world pipeline; resumes from ``out_dir/train_state.pt`` when it matches ``cfg``.

    Returns ``(pipeline with EMA weights in float32, history)``, ``history`` being a list of
    ``{"step", "loss", "seconds"}`` records.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(cfg.model, seed=cfg.seed)
    pipe.unet.train()
    pipe.text_encoder.train()
    noise_sched = train_scheduler(cfg.model)
    params = _params(pipe)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup, cfg.steps)
    ema = EMAModel(params, decay=cfg.ema_decay)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    start, elapsed = 0, 0.0

    state_path = out_dir / "train_state.pt"
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if state["config_hash"] == cfg.hash():
            pipe.unet.load_state_dict(state["unet"])
            pipe.text_encoder.load_state_dict(state["text_encoder"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            ema.load_state_dict(state["ema"])
            rng.bit_generator.state = state["rng"]
            gen.set_state(state["gen"])
            start, history, elapsed = state["step"], state["history"], state["seconds"]
            log.info("resuming training at step %d of %d", start, cfg.steps)
        else:
            log.warning("ignoring %s: it belongs to another training config", state_path)

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not progress)
    t0 = time.perf_counter() - elapsed
    running = []
    for step in bar:
        images, captions, _ = render_batch(rng, cfg.batch_size, cfg.model.image_size, p_omit=cfg.p_omit)
        drop = rng.random(len(captions)) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop)]
        loss = diffusion_loss(pipe, noise_sched, images, captions, gen, cfg.min_snr_gamma).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {step}: lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        running.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            rec = {"step": step + 1, "loss": float(np.mean(running)), "seconds": time.perf_counter() - t0}
            history.append(rec)
            running = []
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            log.info("step %d loss %.4f (%.0f s)", rec["step"], rec["loss"], rec["seconds"])
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            tmp = state_path.with_suffix(".tmp")
            torch.save(
                {
                    "config_hash": cfg.hash(), "step": step + 1, "history": history,
                    "seconds": time.perf_counter() - t0, "unet": pipe.unet.state_dict(),
                    "text_encoder": pipe.text_encoder.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "ema": ema.state_dict(), "rng": rng.bit_generator.state,
                    "gen": gen.get_state(),
                },
                tmp,
            )
            tmp.replace(state_path)  # atomic: a kill during the write never leaves a broken state
    ema.copy_to(params)
    # The shipped model is the float16-rounded EMA model, evaluated in float32.
    for p in params:
        p.data = p.data.half().float()
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return pipe, history


def save_model(pipe, out_dir: str | Path, cfg: TrainConfig, history: list[dict]) -> Path:
    """Write the pipeline (float16 safetensors) and ``train_config.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    pipe.to(torch.float16).save_pretrained(out_dir / "pipeline", safe_serialization=True)
    pipe.to(torch.float32)
    record = {
        "config": cfg.to_dict(), "config_hash": cfg.hash(), "history": history,
        "seconds": history[-1]["seconds"] if history else None,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    (out_dir / "train_config.json").write_text(json.dumps(record, indent=1))
    state = out_dir / "train_state.pt"
    if state.exists():
        state.unlink()
    return out_dir
