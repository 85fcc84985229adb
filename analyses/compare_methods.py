"""Compare attribution methods against true ablation on the same components, objective and samples.

    python -m analyses.compare_methods                      # the default run on the shipped concept world
    python -m analyses.compare_methods --concepts red circle --kinds ff.net.0 --blocks mid_block

Writes a run folder (default reports/compare-<hash>/) with results.parquet, meta.json, tables/, figures/ and a
self-contained index.html. Re-running the same configuration reuses the cache in the folder; an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from interp.compare import CompareConfig

    d = CompareConfig()
    p = argparse.ArgumentParser(prog="python -m analyses.compare_methods", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model,
                   help="'concept-world' (shipped), a folder written by save_pretrained, or a hub id (default %(default)s)")
    p.add_argument("--concepts", nargs="+", default=list(d.concepts),
                   help="concept words (concept world: attribute values such as red, circle, striped; default %(default)s)")
    p.add_argument("--methods", nargs="+", default=list(d.methods),
                   help="methods to run; 'ablation' is always needed as the reference (default %(default)s)")
    p.add_argument("--granularity", default=d.granularity, choices=["layer", "neuron", "head"],
                   help="component granularity (default %(default)s)")
    p.add_argument("--families", nargs="*", default=list(d.families),
                   help="component families: ff attn1 attn2 resnet text_attn text_mlp ... (default %(default)s)")
    p.add_argument("--kinds", nargs="*", default=list(d.kinds),
                   help="module kinds within the families, e.g. ff.net.0 (hidden units) or ff.net.2 (outputs); "
                        "empty for all (default %(default)s)")
    p.add_argument("--blocks", nargs="*", default=list(d.blocks),
                   help="UNet stages to include, e.g. mid_block up_blocks.0 (default: all)")
    p.add_argument("--objective", default=d.objective, choices=["erase", "amplify", "classifier"],
                   help="objective J (default %(default)s)")
    p.add_argument("--anchor", default=d.anchor, choices=["shared", "frozen"],
                   help="erase objective: ablate the anchor branch too (shared) or keep it intact (frozen, CAD's "
                        "stop-gradient literally); default %(default)s")
    p.add_argument("--images", type=int, default=d.n_images, help="evaluation images per concept (default %(default)s)")
    p.add_argument("--timesteps", type=int, nargs="+", default=list(d.timesteps),
                   help="diffusion timesteps of the evaluation set (default %(default)s)")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "float64"], help="compute dtype (default %(default)s)")
    p.add_argument("--coar-masks", type=int, default=d.coar_masks,
                   help="COAR's random masks (default: twice the number of components)")
    p.add_argument("--maskgrad-masks", type=int, default=d.maskgrad_masks,
                   help="random masks K of the mask-averaged gradient (default %(default)s)")
    p.add_argument("--maskgrad-curve", type=int, nargs="*", default=list(d.maskgrad_curve),
                   help="also report the mask-averaged gradient from its first K masks, for each K (free; "
                        "default %(default)s)")
    p.add_argument("--screen-fraction", type=float, default=d.screen_fraction,
                   help="screen-then-verify: share of components, ranked by the mask-averaged gradient, whose true "
                        "ablation effect is measured (default %(default)s)")
    p.add_argument("--heldout-masks", type=int, default=d.heldout_masks,
                   help="held-out joint-ablation masks per ablation rate for the LDS (default %(default)s)")
    p.add_argument("--lds-alphas", type=float, nargs="+", default=list(d.lds_alphas),
                   help="ablation rates of the held-out masks (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every random choice (default %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default reports/compare-<config hash>)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    import torch

    from interp.compare import CompareConfig, run_comparison
    from interp.store import config_hash

    torch.set_num_threads(args.threads)
    try:
        cfg = CompareConfig(
            model=args.model, concepts=tuple(args.concepts), methods=tuple(args.methods),
            granularity=args.granularity, families=tuple(args.families), kinds=tuple(args.kinds),
            blocks=tuple(args.blocks), objective=args.objective, anchor=args.anchor, n_images=args.images,
            timesteps=tuple(args.timesteps), dtype=args.dtype, coar_masks=args.coar_masks,
            maskgrad_masks=args.maskgrad_masks, maskgrad_curve=tuple(args.maskgrad_curve),
            screen_fraction=args.screen_fraction, heldout_masks=args.heldout_masks,
            lds_alphas=tuple(args.lds_alphas), seed=args.seed,
        )
        out = args.out or Path("reports") / f"compare-{config_hash(cfg.to_dict())[:10]}"
        result = run_comparison(cfg, out, progress=not args.no_progress, log=logging.info)
    except (ValueError, KeyError, FileNotFoundError, TypeError) as err:
        parser.exit(2, f"error: {err}\n")
    corr = result["tables"]["correlations"]
    logging.info("\ncorrelation with true ablation:\n%s",
                 corr[["concept", "method", "n", "pearson", "spearman", "kendall"]].to_string(index=False))
    lds = result["tables"]["lds"].pivot_table(index=["concept", "method"], columns="alpha", values="lds_spearman")
    logging.info("\nLDS (Spearman) on held-out joint ablations, by ablation rate:\n%s", lds.round(3).to_string())
    for key, m in result["meta"]["methods"].items():
        if key.startswith("coar/"):
            logging.info("COAR %s: held-out LDS on its own %d test masks: Spearman %.3f, Pearson %.3f",
                         key.split("/", 1)[1], m["n_test"], m["lds_spearman"], m["lds_pearson"])
    logging.info("report: %s", (out / "index.html").resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
