"""Basu et al.'s text-encoder claim, end to end: does restoring one text-encoder layer's clean state at the subject
token restore the concept in the generated images?

    python -m analyses.text_restoration                                  # red, circle, striped on the concept world
    python -m analyses.text_restoration --concepts blue --images 48 --noise 3

For each concept (interp.methods.tracing.text_restoration): the subject tokens' embeddings are corrupted as causal
tracing does (Gaussian noise, --noise-scale x the embeddings' standard deviation, --noise draws), one text layer's
clean output is restored at the last subject token, at the end-of-text token, or at every position, the images are
generated from the objective's held prompts and noises (--steps denoising steps) and judged; the table gives the
concept rate and the judge's mean probability, and the share of the clean-vs-corrupted gap each restoration closes.
Writes the tidy table as CSV (--out) and prints it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import pandas as pd

import interp
from analyses._cli import (
    add_no_progress_argument,
    add_threads_argument,
    apply_threads,
    quiet_if_asked,
    run_or_exit,
    threads_error,
)
from interp.core.concepts import judged_concept
from interp.core.objectives import ObjectiveConfig
from interp.methods.tracing import text_restoration


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analyses.text_restoration", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="concept-world", help="model name or folder (default %(default)s)")
    p.add_argument("--concepts", nargs="+", default=["red", "circle", "striped"],
                   help="concepts (default %(default)s)")
    p.add_argument("--judge", default="classifier", help="image judge (default %(default)s)")
    p.add_argument("--alternatives", nargs="+", default=(), metavar="PHRASE",
                   help="models other than the concept world: the phrases the judge weighs each concept against "
                        "(default: the judge's generic ones)")
    p.add_argument("--images", type=int, default=24, help="prompts (one image each) per concept (default %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps (default %(default)s)")
    p.add_argument("--noise", type=int, default=3, help="noise draws of the corruption (default %(default)s)")
    p.add_argument("--noise-scale", type=float, default=3.0,
                   help="corruption: noise std in units of the embeddings' std (default %(default)s, as tracing)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts, noises and corruption (default %(default)s)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale of the images (default: the model's)")
    p.add_argument("--max-batch", type=int, default=256,
                   help="UNet rows per pass, >= 1: lower it when a GPU runs out of memory (default %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="device (default %(default)s: CUDA, else MPS, else CPU)")
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16", "float64"],
                   help="precision of the forward passes (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("reports/text-restoration.csv"),
                   help="CSV of the tidy table (default %(default)s)")
    add_threads_argument(p)
    add_no_progress_argument(p)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images < 1 or args.steps < 1 or args.noise < 1 or args.noise_scale < 0 or args.max_batch < 1:
        parser.exit(2, "error: --images, --steps, --noise, --max-batch must be >= 1 and --noise-scale >= 0\n")

    if threads_error(args.threads):
        parser.exit(2, f"error: {threads_error(args.threads)}\n")
    if args.guidance is not None and not 0 <= args.guidance < 1e4:
        parser.exit(2, f"error: --guidance must be a scale >= 0 (1: unguided), got {args.guidance}\n")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    def restore_every_concept() -> list:
        model = interp.load_model(args.model, device=args.device, dtype=args.precision)
        cfg = ObjectiveConfig(kind="classifier", n_images=args.images, gen_steps=args.steps, seed=args.seed,
                              judge=args.judge, guidance=args.guidance, max_batch=args.max_batch,
                              dtype=args.precision)
        frames = []
        for c in args.concepts:
            t1 = time.perf_counter()
            concept = judged_concept(model, c, args.alternatives, n=args.images)
            frames.append(text_restoration(model, concept, cfg, noise_scale=args.noise_scale, n_noise=args.noise,
                                           seed=args.seed))
            logging.info("%s: %.1f s", c, time.perf_counter() - t1)
        return frames

    apply_threads(parser, args.threads)
    t0 = time.perf_counter()
    with quiet_if_asked(args):  # an expected failure (a missing model, an unknown concept) is one line, exit 2
        frames = run_or_exit(parser, None, restore_every_concept)
    df = pd.concat(frames, ignore_index=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    cols = ["concept", "layer", "position", "concept_rate", "restored_rate", "restored_rate_se", "p_concept",
            "restored_p"]
    logging.info("%s", df[cols].round(3).to_string(index=False))
    logging.info("wall time %.1f s; table: %s", time.perf_counter() - t0, args.out.resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
