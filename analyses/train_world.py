"""(Re)train a shipped concept-world model: classifier, text-to-image model, fidelity, sample grid.

    python -m analyses.train_world --out interp/world/assets/concept-world
    python -m analyses.train_world --model concept-world-latent     # CLIP (its text tower), VAE, then latent UNet
    python -m analyses.train_world --model concept-world-dit        # an SD3 transformer on the latent model's VAE

Resumable: an interrupted training continues from its last saved state in the output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from analyses._cli import add_no_progress_argument, quiet_if_asked
from interp.core.models import load_model
from interp.core.store import atomic_write_text
from interp.world.classifier import train_classifier
from interp.world.dit import DiTTrainConfig, save_dit
from interp.world.dit import train_dit as train_transformer
from interp.world.fidelity import GRID_PROMPTS, measure_fidelity, reconstruction_accuracy, sample_grid
from interp.world.model import ModelConfig
from interp.world.plugin import ASSETS, DIT_KIND, LATENT_KIND
from interp.world.train import LatentTrainConfig, TrainConfig, VAETrainConfig, save_model, train
from interp.world.train import train_latent as train_phases

#: The guidance scale concept-world-dit samples at by default (its world.json), chosen by the scan in its model card.
DIT_GUIDANCE = 2.0


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m analyses.train_world", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("concept-world", "concept-world-latent", "concept-world-dit"), default="concept-world",
                   help="which model to train (default: the pixel-space concept-world)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the shipped checkpoint's)")
    p.add_argument("--steps", type=int, default=None,
                   help="diffusion training steps (default: the model's, 3600 for concept-world, ~40 min on 2 idle "
                        "cores; 2000 for concept-world-latent)")
    p.add_argument("--vae-steps", type=int, default=None, help="VAE training steps (concept-world-latent only)")
    p.add_argument("--guidance", type=float, default=None,
                   help="concept-world-latent and -dit: the guidance scale it samples at by default, written to its "
                        "world.json and used for its fidelity (default: 2 for the latent model, "
                        f"{DIT_GUIDANCE:g} for the DiT; 1: unguided)")
    p.add_argument("--text-encoder", default=None,
                   help="concept-world-latent only: the CLIP whose text tower is the frozen text encoder (default: "
                        "one trained first, with a 6-layer text tower; or a shipped judge's name such as "
                        "concept-world-clip, or a CLIPModel folder), or 'joint' to train one with the UNet")
    p.add_argument("--clip-steps", type=int, default=None,
                   help="concept-world-latent only: training steps of that CLIP (default 1500)")
    p.add_argument("--timesteps", choices=("logit_normal", "uniform"), default=None,
                   help="concept-world-dit only: how training draws the noise level sigma (default: the shipped "
                        "recipe's; logit_normal is SD3's)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per training step (default: the model's, 128 for concept-world, 64 for the latent one)")
    p.add_argument("--classifier-steps", type=int, default=1500, help="concept-classifier training steps")
    p.add_argument("--retrain-classifier", action="store_true", help="retrain the classifier even if one exists in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 2; 1 for concept-world-dit, whose shipped files were trained on "
                        "one: training is bitwise reproducible for a given thread count)")
    p.add_argument("--fidelity-images", type=int, default=360, help="held-out images generated to measure fidelity")
    add_no_progress_argument(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads is None:
        args.threads = 1 if args.model == "concept-world-dit" else 2
    if args.guidance is None:
        args.guidance = DIT_GUIDANCE if args.model == "concept-world-dit" else 2.0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)

    with quiet_if_asked(args):
        return _train(args)


def _train(args) -> int:
    if args.timesteps is not None and args.model != "concept-world-dit":
        raise SystemExit("--timesteps: only concept-world-dit is trained with flow matching")
    out: Path = args.out or ASSETS / args.model
    out.mkdir(parents=True, exist_ok=True)
    if args.model == "concept-world-latent":
        return train_latent(args, out)
    if args.model == "concept-world-dit":
        return train_dit(args, out)
    if args.retrain_classifier or not (out / "classifier.safetensors").exists():
        clf, acc = train_classifier(steps=args.classifier_steps, seed=args.seed, progress=not args.no_progress)
        clf.save(out, {"heldout_accuracy": acc, "n_test": 2000, "steps": args.classifier_steps})
        logging.info("classifier held-out accuracy: %s", acc)
    cfg = TrainConfig(model=ModelConfig(), steps=args.steps or 3600, batch_size=args.batch_size or 128, seed=args.seed)
    pipe, history = train(cfg, out, progress=not args.no_progress)
    save_model(pipe, out, cfg, history)
    summary = evaluate_checkpoint(out, args.fidelity_images, progress=not args.no_progress)
    logging.info("fidelity: %s", summary["accuracy"])
    return 0


def latent_config(args):
    """The latent model's training config from the command line: ``LatentTrainConfig()`` where no flag is given, so
    the command without flags reproduces the shipped model."""

    defaults = LatentTrainConfig()
    if args.text_encoder == "joint":
        text = None
    elif args.text_encoder:
        text = args.text_encoder
    else:  # phase 0: train the CLIP whose text tower becomes the encoder
        text = dataclasses.replace(defaults.text, steps=args.clip_steps or defaults.text.steps, seed=args.seed)
    return LatentTrainConfig(
        steps=args.steps or defaults.steps, batch_size=args.batch_size or defaults.batch_size, seed=args.seed,
        vae=VAETrainConfig(steps=args.vae_steps or defaults.vae.steps, seed=args.seed), text=text,
    )


def train_latent(args, out: Path) -> int:
    """``concept-world-latent``: a CLIP whose frozen text tower is the text encoder, its VAE, then its UNet on the
    VAE's latents (:func:`interp.world.train.train_latent`); every phase resumes from its saved state in ``out``.
    The judges are reused, not trained: the pixel world's 16-px classifier, judging 32-px images resized (measured
    100% per attribute on 2,000 resized held-out 32-px renders), and the suite's CLIP judge."""

    if args.retrain_classifier:
        raise SystemExit("--retrain-classifier: concept-world-latent reuses the concept-world classifier; retrain "
                         "that one with `python -m analyses.train_world --retrain-classifier`")
    if args.clip_steps is not None and (args.clip_steps < 1 or args.text_encoder):
        raise SystemExit(f"--clip-steps {args.clip_steps}: give a positive number of steps, and only without "
                         f"--text-encoder (it sets the training of the CLIP trained first)")
    if not 0 <= args.guidance < 1e4:
        raise SystemExit(f"--guidance must be a scale >= 0 (1: unguided), got {args.guidance}")
    cfg = latent_config(args)
    pipe, history, records = train_phases(cfg, out, progress=not args.no_progress)
    logging.info("trained: %s", {k: v for k, v in records.items() if not k.endswith("history")})
    save_model(pipe, out, cfg, history, extra={
        **records, "parameters": {k: sum(p.numel() for p in getattr(pipe, k).parameters())
                                  for k in ("vae", "unet", "text_encoder")},
    })
    atomic_write_text(out / "world.json", json.dumps({"kind": LATENT_KIND, "image_size": cfg.model.image_size,
                                                       "default_guidance": args.guidance}, indent=1))
    for state in ("clip_state.pt", "vae_state.pt"):  # finished phases' states, kept until the model is saved
        (out / state).unlink(missing_ok=True)
    summary = evaluate_checkpoint(out, args.fidelity_images, progress=not args.no_progress,
                                  targets={"color": 0.95, "shape": 0.95, "texture": 0.90, "background": 0.95})
    logging.info("fidelity: %s; VAE reconstructions: %s", summary["accuracy"], summary["vae_reconstruction_accuracy"])
    return 0


def dit_config(args):
    """The DiT's training config from the command line: ``DiTTrainConfig()`` where no flag is given, so the command
    without flags reproduces the shipped model."""

    defaults = DiTTrainConfig()
    return DiTTrainConfig(steps=args.steps or defaults.steps, batch_size=args.batch_size or defaults.batch_size,
                          timesteps=args.timesteps or defaults.timesteps, seed=args.seed)


def train_dit(args, out: Path) -> int:
    """``concept-world-dit``: an SD3 transformer trained with flow matching on the latents of concept-world-latent's
    shipped VAE, conditioned by its shipped frozen text tower (:func:`interp.world.dit.train_dit`, resumable from
    ``out/train_state.pt``); the judge is the pixel world's classifier, reused as for the latent model."""

    for flag in ("vae_steps", "clip_steps", "text_encoder"):
        if getattr(args, flag) is not None:
            raise SystemExit(f"--{flag.replace('_', '-')}: concept-world-dit reuses concept-world-latent's VAE and "
                             f"text tower; it trains only its transformer")
    if args.retrain_classifier:
        raise SystemExit("--retrain-classifier: concept-world-dit reuses the concept-world classifier")
    if not 0 <= args.guidance < 1e4:
        raise SystemExit(f"--guidance must be a scale >= 0 (1: unguided), got {args.guidance}")
    cfg = dit_config(args)
    pipe, history, records = train_transformer(cfg, out, progress=not args.no_progress)
    save_dit(pipe, out, cfg, history, records)
    atomic_write_text(out / "world.json", json.dumps({"kind": DIT_KIND, "image_size": cfg.model.image_size,
                                                       "default_guidance": args.guidance}, indent=1))
    summary = evaluate_checkpoint(out, args.fidelity_images, progress=not args.no_progress,
                                  targets={"color": 0.95, "shape": 0.95, "texture": 0.90, "background": 0.95})
    logging.info("fidelity: %s", summary["accuracy"])
    return 0


def evaluate_checkpoint(out: Path, n_images: int = 360, progress: bool = True, targets: dict | None = None) -> dict:
    """Measure the fidelity of the checkpoint in ``out`` (fidelity.json) and draw its sample grid (samples.png);
    for a model with a VAE also the classifier's accuracy on VAE reconstructions of held-out renders."""

    model = load_model(out)
    summary, per_image = measure_fidelity(model, n=n_images, progress=progress)
    clf_dir = out if (out / "classifier.json").exists() else ASSETS / "concept-world"  # the reused classifier
    summary["classifier_accuracy"] = json.loads((clf_dir / "classifier.json").read_text())["metrics"]["heldout_accuracy"]
    if model.vae is not None:
        summary["vae_reconstruction_accuracy"] = reconstruction_accuracy(model, model.world.image_size)
    summary["targets"] = targets or {"color": 0.95, "shape": 0.90, "texture": 0.85, "background": 0.95}
    summary["meets_targets"] = all(summary["accuracy"][a] >= t for a, t in summary["targets"].items())
    atomic_write_text(out / "fidelity.json", json.dumps(summary, indent=1))
    sample_grid(model, GRID_PROMPTS).savefig(out / "samples.png", dpi=100)
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
