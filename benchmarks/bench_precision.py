"""What precision to trust for what: true ablation and CAD in bfloat16 / float16 / float32 against float64.

    .venv/bin/python benchmarks/bench_precision.py [--concepts red blue ...] [--threads 2]

On the shipped concept world, the default comparison's component set (the 448 feed-forward output neurons) and
objective (CAD's erase objective, 4 renders x 2 timesteps): for each precision of the forward passes, the Spearman
and Pearson correlation of each method's scores with the same method in float32 and with true ablation in float64,
plus the wall time. Objective values and gradients are accumulated in float32 whatever the forward precision, and
the evaluation set's noise is drawn once and cast, so the precision is the only thing that changes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch
from scipy import stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", nargs="+", default=["red", "blue", "circle", "square", "striped"])
    p.add_argument("--precisions", nargs="+", default=["float64", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import interp
    from interp.core.objectives import Objective, ObjectiveConfig
    from interp.studies.compare import CompareConfig, select_components

    cfg = CompareConfig()
    model = interp.load_model("concept-world", device="cpu")
    comps = select_components(model, cfg)
    rows, scores = [], {}
    for concept in args.concepts:
        for prec in args.precisions:
            ocfg = ObjectiveConfig(kind=cfg.objective, anchor=cfg.anchor, n_images=cfg.n_images,
                                   timesteps=cfg.timesteps, seed=cfg.seed, dtype=prec)
            obj = Objective(model, concept, ocfg)
            for method in ("ablation", "cad"):
                t0 = time.perf_counter()
                df = interp.attribute(method, model, concept, comps, objective=obj)
                scores[(concept, prec, method)] = df["score"].to_numpy()
                rows.append({"concept": concept, "precision": prec, "method": method,
                             "seconds": time.perf_counter() - t0})
    out = []
    for r in rows:
        s = scores[(r["concept"], r["precision"], r["method"])]
        same32 = scores.get((r["concept"], "float32", r["method"]))
        truth = scores.get((r["concept"], "float64", "ablation"))
        out.append({**r,
                    "spearman_vs_float32": stats.spearmanr(s, same32)[0] if same32 is not None else np.nan,
                    "spearman_vs_truth64": stats.spearmanr(s, truth)[0] if truth is not None else np.nan,
                    "pearson_vs_truth64": stats.pearsonr(s, truth)[0] if truth is not None else np.nan})
    table = pd.DataFrame(out)
    pd.set_option("display.width", 160)
    print(f"{len(comps)} components; objective {cfg.objective} ({cfg.n_images} images x {len(cfg.timesteps)} "
          f"timesteps); torch threads {args.threads}")
    print(table.round(4).to_string(index=False))
    summary = table.groupby(["method", "precision"])[["spearman_vs_float32", "spearman_vs_truth64",
                                                      "pearson_vs_truth64", "seconds"]]
    print("\nmean over concepts (min in brackets for the correlations):")
    mean, mn = summary.mean(), summary.min()
    for (method, prec), r in mean.iterrows():
        m = mn.loc[(method, prec)]
        print(f"  {method:8s} {prec:8s}  vs float32 {r.spearman_vs_float32:.4f} ({m.spearman_vs_float32:.4f})  "
              f"vs float64 ablation: Spearman {r.spearman_vs_truth64:.4f} ({m.spearman_vs_truth64:.4f}), "
              f"Pearson {r.pearson_vs_truth64:.4f} ({m.pearson_vs_truth64:.4f})  {r.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
