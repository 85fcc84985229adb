"""The optimization loop every training phase of the concept world runs (pixel model, VAE, latent UNet, CLIP):
seeded, clipped AdamW steps on fresh batches, with a state written atomically every few steps so an interrupted
phase resumes to the weights an uninterrupted one reaches."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from interp.core.store import config_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """What the training configs share: a positive length and batch, validated on construction, and a stable hash
    of every field (the key a resumed training state must match)."""

    def __post_init__(self):
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps} and {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    def hash(self) -> str:
        return config_hash(self.to_dict())


def resume(state_path: Path | None, key: str, parts: dict, rng, gen, what: str) -> tuple[int, list, float]:
    """Load ``state_path`` into ``parts`` (name -> object with ``load_state_dict``) and the random streams when it
    was written for ``key``; returns ``(step, history, seconds)`` to continue from (0, [], 0.0 when starting)."""
    if state_path is None or not state_path.exists():
        return 0, [], 0.0
    state = torch.load(state_path, weights_only=False)
    if state["config_hash"] != key:
        log.warning("ignoring %s: it belongs to another training config", state_path)
        return 0, [], 0.0
    for name, part in parts.items():
        part.load_state_dict(state[name])
    rng.bit_generator.state = state["rng"]
    gen.set_state(state["gen"])
    log.info("resuming %s at step %d", what, state["step"])
    return state["step"], state["history"], state["seconds"]


def checkpoint(state_path: Path, key: str, step: int, history: list, seconds: float, parts: dict, rng, gen) -> None:
    """Write a training state atomically: a kill during the write never leaves a broken state."""
    tmp = state_path.with_suffix(".tmp")
    torch.save({"config_hash": key, "step": step, "history": history, "seconds": seconds,
                **{name: part.state_dict() for name, part in parts.items()},
                "rng": rng.bit_generator.state, "gen": gen.get_state()}, tmp)
    tmp.replace(state_path)


def fit(batch_loss, cfg: Recipe, params: list, opt, sched, state_path: Path | None, key: str, parts: dict, rng,
         gen, what: str, progress: bool, ema=None, mark_done: bool = False, after_step=None) -> tuple[list, float]:
    """The optimization loop every training phase runs: resume from ``state_path`` if it was written for ``key``,
    then ``cfg.steps`` clipped AdamW steps on ``batch_loss(step)`` (the scheduler, ``ema`` and ``after_step()``
    after each), a ``{"step", "loss", "seconds"}`` history record every ``log_every`` steps and a state every
    ``save_every`` (``mark_done``: also at the end, so a finished phase is never run again; ``state_path`` None:
    no state). Returns ``(history, seconds)``."""
    start, history, elapsed = resume(state_path, key, parts, rng, gen, what)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=what,
               disable=not progress or start >= cfg.steps)
    t0 = time.perf_counter() - elapsed
    running = []
    for step in bar:
        loss = batch_loss(step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{what} loss is {loss.item()} at step {step}: lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.step(params)
        if after_step is not None:
            after_step()
        running.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            rec = {"step": step + 1, "loss": float(np.mean(running)), "seconds": time.perf_counter() - t0}
            history.append(rec)
            running = []
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            log.info("%s step %d loss %.4f (%.0f s)", what, rec["step"], rec["loss"], rec["seconds"])
        last = step + 1 == cfg.steps
        if state_path is not None and ((step + 1) % cfg.save_every == 0 and not last or mark_done and last):
            checkpoint(state_path, key, step + 1, history, time.perf_counter() - t0, parts, rng, gen)
    return history, time.perf_counter() - t0
