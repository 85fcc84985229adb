"""Compare attribution methods against true ablation on the same components, objective and samples.

    python -m analyses.compare_methods                      # the default run on the shipped concept world
    python -m analyses.compare_methods --concepts red circle --kinds ff.net.0 --blocks mid_block

Writes a run folder (default reports/compare-<hash>/) with results.parquet, meta.json, tables/, figures/, a
self-contained index.html and status.json (running, complete, or failed with traceback.txt). Re-running the same
configuration reuses the cache in the folder; an interrupted run resumes where it stopped. Every option below is a
field of interp.studies.compare_config.CompareConfig, or an option a method's file declares (--plugin FILE.py loads
a method of your own). Expected failures print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from analyses._cli import (
    add_executor_arguments,
    apply_threads,
    config_parser,
    executor_from_args,
    load_plugins,
    parse_config,
    quiet_if_asked,
    run_or_exit,
)
from interp.core.store import config_hash
from interp.studies.compare import run_comparison
from interp.studies.compare_config import CompareConfig
from interp.studies.plan import plan_comparison


def build_parser() -> argparse.ArgumentParser:
    """The options are CompareConfig's fields (typed and documented there), each registered method's options (its
    file declares them), plus how to run: --out, --threads, --plan, --no-progress and the executor's."""

    p = config_parser("compare_methods", __doc__, CompareConfig, "run folder (default reports/compare-<config hash>)",
                      methods=True, plan=True)
    add_executor_arguments(p)
    return p


def main(argv=None) -> int:
    load_plugins(sys.argv[1:] if argv is None else argv, "compare_methods")

    parser = build_parser()
    args, cfg = parse_config(parser, CompareConfig, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    apply_threads(parser, args.threads)

    with quiet_if_asked(args):
        return _run(parser, args, cfg)


def _run(parser, args, cfg) -> int:
    if args.plan:
        # the plan starts no cluster: with --executor ray it projects onto the workers asked for (default: one per
        # CPU of this machine, as a local cluster would have)
        workers = None
        if args.executor == "ray":
            workers = args.ray_workers or max(1, (os.cpu_count() or 1) // (args.ray_cpus_per_worker or 1))
        print(run_or_exit(parser, None, lambda: plan_comparison(cfg, workers=workers)).format())
        return 0

    executor = executor_from_args(parser, args)
    out = args.out or Path("reports") / f"compare-{config_hash(cfg.to_dict())[:10]}"
    try:
        result = run_or_exit(parser, out, lambda: run_comparison(cfg, out, progress=not args.no_progress,
                                                                 log=logging.info, executor=executor))
    finally:
        executor.close()
    corr = result["tables"]["correlations"]
    logging.info("\ncorrelation with true ablation:\n%s",
                 corr[["concept", "variant", "n", "pearson", "spearman", "kendall"]].to_string(index=False))
    lds = result["tables"]["lds"].pivot_table(index=["concept", "variant"], columns="alpha", values="lds_spearman")
    logging.info("\nLDS (Spearman) on held-out joint ablations, by ablation rate:\n%s", lds.round(3).to_string())
    logging.info("report: %s", (out / "index.html").resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
