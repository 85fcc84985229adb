"""Ground truth for SAE features: which feature detects which attribute value of the concept world.

    python -m analyses.sae_ground_truth --sae runs/sae-mid-ff --out reports/sae-gt
    python -m analyses.sae_ground_truth --sae runs/sae-up --images 512 --steps 10 --out reports/sae-gt-up

The concept world knows what every image shows. --images held-out images (the world plugin's held-out scenes, every
attribute named in the caption, the 16 values taking turns as the pinned value; scenes and noises of the evaluation
seed stream, which no SAE or attribution saw) are generated, and at every denoising step the SAE's site is read:
each feature's activation and each of the site's output channels (its neurons), averaged over positions (--pool max:
their largest value over the positions), then over
the steps and over three timestep bands (high, mid, low noise). For each of the 16 attribute values the AUROC of
every feature against "the prompt names the value" is computed (interp.core.features.value_auroc); the table gives the
best feature, the best single neuron of the same site (either sign), their AUROCs and whether the value has a
monosemantic feature (AUROC >= 0.95).

Writes to --out: table.csv (one row per value), summary.json (the fraction of values with a monosemantic feature,
mean AUROCs, ...), images.csv (each image's prompt, values and the judge's verdicts), figures/gallery.png (for the
best feature of each value: its top-activating generated images and its activation by timestep), index.html,
meta.json and status.json. Reading the site changes nothing in the model. Expected failures print one line and exit
with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import interp
from analyses._cli import apply_threads, config_parser, parse_config, quiet_if_asked, run_or_exit
from interp.core import features
from interp.core.judges import load_judge
from interp.core.runs import Run
from interp.core.store import config_hash
from interp.report import render_report, settings_rows
from interp.report.plots import fig_to_png, png_to_data_uri
from interp.studies.compare_config import DEVICES, PRECISIONS, check_fields, opt


@dataclass(frozen=True)
class GroundTruthConfig:
    """Everything a ground-truth run depends on; its hash names the default run folder. The command line is
    generated from it; validated on construction, before anything loads."""

    sae: str = opt("", "folder of the sparse autoencoder (written by analyses.train_sae)", metavar="FOLDER")
    model: str = opt("concept-world", "'concept-world' (shipped) or a concept-world folder: the images' attributes "
                                      "must be known")
    images: int = opt(256, "held-out images generated (the 16 values take turns as each scene's pinned value)")
    steps: int = opt(10, "denoising steps per image (each step's activations are recorded)")
    guidance: float | None = opt(None, "classifier-free guidance scale (default: the model's)")
    pool: str = opt("mean", "how a step's activations are pooled over the site's positions: mean, or max (a feature "
                            "that fires on the shape's positions only is not diluted by the background's)",
                    choices=("mean", "max"))
    top: int = opt(8, "top-activating images per feature in the gallery")
    splice_images: int = opt(64, "held-out images generated with and without the SAE spliced into its site (its "
                                 "reconstruction in place of the site's output), for the change of the denoising "
                                 "loss and of the judged fidelity (0: not measured)")
    max_batch: int = opt(64, "images per generation call")
    seed: int = opt(0, "added to the held-out seed stream (scenes and noises)")
    device: str = opt("auto", "device: auto (CUDA, else MPS, else CPU), cpu, cuda or mps", choices=DEVICES)
    dtype: str = opt("float32", "precision of the forward passes", choices=PRECISIONS, flags=("--precision",))

    def __post_init__(self):
        check_fields(self)
        if not self.sae:
            raise ValueError("--sae is required: pass a folder written by python -m analyses.train_sae --out FOLDER")
        if not (Path(self.sae).expanduser() / "sae.safetensors").is_file():
            raise ValueError(f"--sae {self.sae} holds no sae.safetensors: pass a folder written by "
                             f"python -m analyses.train_sae --out FOLDER")
        if self.images < 16:
            raise ValueError(f"--images must be >= 16 (one per attribute value at least), got {self.images}")
        if self.splice_images < 0:
            raise ValueError(f"--splice-images must be >= 0, got {self.splice_images}")
        for name in ("steps", "top", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        """The fields as a dict (the run folder's hash and ``meta.json``)."""
        return asdict(self)


def build_parser() -> argparse.ArgumentParser:
    """GroundTruthConfig's fields, plus --out, --threads and --no-progress."""

    return config_parser("sae_ground_truth", __doc__, GroundTruthConfig, "run folder (default reports/sae-gt-<config hash>)")


def run(cfg: GroundTruthConfig, out: Path, progress: bool = True, log=lambda msg: None) -> dict:
    """Generate, record, score and write the run folder; returns the summary."""

    with Run(out, cfg.to_dict(), "sae-ground-truth") as r:
        result = _run(cfg, r, progress, log)
        r.complete()
    return result


def _run(cfg: GroundTruthConfig, r, progress: bool, log) -> dict:
    t0 = time.perf_counter()
    model = interp.load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    if model.world is None:
        raise ValueError(f"--model {cfg.model} is no concept world: the ground truth needs images with known "
                         f"attributes")
    sae = features.load_sae(cfg.sae)
    judge = load_judge("classifier", model=model) if getattr(model, "classifier", None) is not None else None
    before = model.state_fingerprint()
    gt = features.value_auroc(model, sae, n_images=cfg.images, steps=cfg.steps, seed=cfg.seed,
                              guidance=cfg.guidance, batch=cfg.max_batch, judge=judge, pool=cfg.pool,
                              progress=progress)
    splice = (features.splice_effect(model, sae, n_images=cfg.splice_images, steps=cfg.steps, seed=cfg.seed,
                                     guidance=cfg.guidance, batch=cfg.max_batch, judge=judge)
              if cfg.splice_images else None)
    changed = [n for n, p in model.parameters() if not (p == before[n]).all()]
    if changed:
        raise RuntimeError(f"weights changed while reading the site: {changed[:3]}")
    seconds = time.perf_counter() - t0
    s = {**gt.summary, "seconds": seconds, "sae": str(cfg.sae), "sae_quality": sae.quality, "splice": splice}
    log(f"{s['n_monosemantic']} of {s['n_values']} values have a feature of AUROC >= {s['monosemantic_threshold']}; "
        f"mean best feature AUROC {s['mean_best_feature_auroc']:.3f}, best neuron {s['mean_best_neuron_auroc']:.3f} "
        f"({seconds:.0f} s)")
    r.write_csv("table.csv", gt.table)
    r.write_csv("images.csv", gt.images)
    r.write_json("summary.json", s)
    png = fig_to_png(features.gallery_figure(gt, n_top=cfg.top))
    r.write_bytes("figures/gallery.png", png)
    meta = r.metadata(summary=s)
    r.write_json("meta.json", meta)
    shown = gt.table.copy()
    for c in [c for c in shown.columns if "auroc" in c]:
        shown[c] = shown[c].round(3)
    bands = ", ".join(f"{n} ({lo:.0f} < t <= {hi:.0f})" for n, (lo, hi) in s["bands"].items())
    summary = [
        f"{s['n_monosemantic']} of {s['n_values']} attribute values have a feature of AUROC >= "
        f"{s['monosemantic_threshold']} (a monosemantic detector) among the {s['n_features']} features at "
        f"{s['site']}; {s['distinct_best_features']} distinct features are the values' best.",
        f"Mean AUROC of each value's best feature {s['mean_best_feature_auroc']:.3f}, of its best single neuron of "
        f"the same site (either sign) {s['mean_best_neuron_auroc']:.3f}; the best feature beats the best neuron on "
        f"{s['values_feature_beats_neuron']} of {s['n_values']} values.",
        f"{s['n_images']} held-out images, {s['steps']} denoising steps, {seconds:.0f} s; the model's weights were "
        "bitwise unchanged afterwards.",
    ]
    if splice:
        summary.append(
            f"Spliced in (its reconstruction in place of the site's output), the SAE multiplies the denoising loss by "
            f"{splice['loss_ratio']:.3f} ({splice['loss_intact']:.4f} -> {splice['loss_spliced']:.4f})"
            + (f"; the judge reads the prompted value on {splice['fidelity_intact']:.1%} of (image, attribute) pairs "
               f"intact and {splice['fidelity_spliced']:.1%} spliced" if "fidelity_intact" in splice else "")
            + f" ({splice['n_images']} held-out images).")
    sections = [
        {"title": "Best feature and best neuron per value",
         "text": "Label: the image's prompt names the value (every caption names all four attributes). Activation: "
                 f"the feature's (or the output channel's) value pooled ({cfg.pool}) over the site's positions, "
                 "averaged over the "
                 "denoising steps, conditional branch. AUROC: the probability that an image with the value scores "
                 "above one without it (ties half); a feature's as is, a neuron's the better of either sign. Band "
                 f"columns: the same on the steps of one timestep band only: {bands}; feature_<band> is the best "
                 "feature in that band, best_feature_auroc_<band> the overall best feature's AUROC there.",
         "tables": [("One row per attribute value", shown)]},
        {"title": "Feature gallery",
         "text": f"For each value, its best feature's {cfg.top} top-activating generated images (number: the "
                 "activation; green frame: the prompt names the value, red: it does not) and the feature's mean "
                 "activation by timestep on images with the value (green) and without (grey).",
         "figures": [("Feature gallery", png_to_data_uri(png))]},
    ]
    render_report(r.out, title="SAE ground truth: which features detect which attribute value?", summary=summary,
                  sections=sections, config=meta, settings=settings_rows(meta, skip=("summary",)))
    return s


def main(argv=None) -> int:
    parser = build_parser()
    args, cfg = parse_config(parser, GroundTruthConfig, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    apply_threads(parser, args.threads)
    out = args.out or Path("reports") / f"sae-gt-{config_hash(cfg.to_dict())[:10]}"
    with quiet_if_asked(args):
        s = run_or_exit(parser, out, lambda: run(cfg, out, progress=not args.no_progress, log=logging.info))
    logging.info("report: %s", (out / "index.html").resolve())
    return 0 if s else 1


if __name__ == "__main__":
    raise SystemExit(main())
