"""(Re)train the shipped concept-world model: classifier, text-to-image model, fidelity, sample grid.

    python -m analyses.train_world --out interp/world/assets/concept-world

Resumable: an interrupted training continues from its last saved state in the output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from interp.world.plugin import ASSETS


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m analyses.train_world", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ASSETS / "concept-world", help="output folder (default: the shipped checkpoint's)")
    p.add_argument("--steps", type=int, default=3600, help="diffusion training steps (default 3600, ~40 min on 2 idle cores)")
    p.add_argument("--batch-size", type=int, default=128, help="images per training step")
    p.add_argument("--classifier-steps", type=int, default=1500, help="concept-classifier training steps")
    p.add_argument("--retrain-classifier", action="store_true", help="retrain the classifier even if one exists in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--fidelity-images", type=int, default=360, help="held-out images generated to measure fidelity")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    from interp.world.classifier import train_classifier
    from interp.world.model import ModelConfig
    from interp.world.train import TrainConfig, save_model, train

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.retrain_classifier or not (out / "classifier.safetensors").exists():
        clf, acc = train_classifier(steps=args.classifier_steps, seed=args.seed, progress=not args.no_progress)
        clf.save(out, {"heldout_accuracy": acc, "n_test": 2000, "steps": args.classifier_steps})
        logging.info("classifier held-out accuracy: %s", acc)
    cfg = TrainConfig(model=ModelConfig(), steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    pipe, history = train(cfg, out, progress=not args.no_progress)
    save_model(pipe, out, cfg, history)
    summary = evaluate_checkpoint(out, args.fidelity_images, progress=not args.no_progress)
    logging.info("fidelity: %s", summary["accuracy"])
    return 0


def evaluate_checkpoint(out: Path, n_images: int = 360, progress: bool = True) -> dict:
    """Measure the fidelity of the checkpoint in ``out`` (fidelity.json) and draw its sample grid (samples.png)."""
    from interp.models import load_model
    from interp.world.fidelity import GRID_PROMPTS, measure_fidelity, sample_grid

    model = load_model(out)
    summary, per_image = measure_fidelity(model, n=n_images, progress=progress)
    summary["classifier_accuracy"] = json.loads((out / "classifier.json").read_text())["metrics"]["heldout_accuracy"]
    summary["targets"] = {"color": 0.95, "shape": 0.90, "texture": 0.85, "background": 0.95}
    (out / "fidelity.json").write_text(json.dumps(summary, indent=1))
    sample_grid(model, GRID_PROMPTS).savefig(out / "samples.png", dpi=100)
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
