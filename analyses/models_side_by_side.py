"""Put comparison runs of several models side by side: do the findings hold beyond one model?

    python -m analyses.models_side_by_side concept-world=reports/cw concept-world-latent=reports/cwl \
        --out reports/side-by-side.md
    python -m analyses.models_side_by_side concept-world=reports/cw concept-world-latent=reports/cwl \
        concept-world-dit=reports/cwd --out reports/side-by-side.md     # any number of models, e.g. the DiT too

Reads each run folder written by ``python -m analyses.compare_methods`` (its ``tables/*.csv`` and
``results.parquet``) and writes one Markdown file: Spearman with true ablation per method, LDS at every held-out
ablation rate with the cost in forward-pass equivalents, the best estimator's LDS against COAR's, where each concept
lives by true ablation (the block with the largest share of |score|), the best erasure trade-off when the runs
measured erasure curves, and a table of findings, each checked on every model by the rule written next to it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from interp.core.results import read_results
from interp.core.store import atomic_write_text


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m analyses.models_side_by_side", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="NAME=FOLDER", help="a label and a compare_methods run folder")
    p.add_argument("--out", type=Path, default=None, help="Markdown file to write (default: print only)")
    return p.parse_args(argv)


def load_run(folder: Path) -> dict:
    """The tables of one comparison run, checked to be complete."""
    tables = folder / "tables"
    need = ["correlations", "accuracy_vs_cost", "cost"]
    missing = [n for n in need if not (tables / f"{n}.csv").exists()]
    if missing or not (folder / "results.parquet").exists():
        raise FileNotFoundError(f"{folder} is not a finished compare_methods run (missing "
                                f"{missing or ['results.parquet']}): run python -m analyses.compare_methods --out {folder}")
    run = {n: pd.read_csv(p) for p in sorted(tables.glob("*.csv")) for n in [p.stem]}
    run["results"] = read_results(folder / "results.parquet")
    return run


def _mean_min(s: pd.Series) -> str:
    return f"{s.mean():.3f} ({s.min():.3f})"


def spearman_table(runs: dict[str, dict]) -> pd.DataFrame:
    """Mean over concepts (worst concept) of each main method's Spearman with true ablation."""
    cols = {}
    for name, run in runs.items():
        c = run["correlations"]
        c = c[c["method"] == c["variant"]]
        cols[name] = c.groupby("method")["spearman"].agg(_mean_min)
    return pd.DataFrame(cols)


def lds_table(runs: dict[str, dict]) -> pd.DataFrame:
    """Mean LDS (worst concept) per main estimate and held-out rate, with its cost per concept."""
    frames = []
    for name, run in runs.items():
        a = run["accuracy_vs_cost"]
        a = a[a["method"] == a["variant"]]
        lds = a.pivot_table(index="method", columns="alpha", values="lds_spearman", aggfunc=list)
        t = pd.DataFrame({f"LDS {alpha:g}": lds[alpha].map(lambda v: _mean_min(pd.Series(v))) for alpha in lds.columns})
        t.insert(0, "cost", a.groupby("method")["forward_evals"].mean().map(lambda v: f"{v:,.0f}"))
        t.columns = pd.MultiIndex.from_product([[name], t.columns])
        frames.append(t)
    return pd.concat(frames, axis=1)


def best_versus_coar(runs: dict[str, dict]) -> pd.DataFrame:
    """Per rate: the estimate (any variant, true ablation and COAR excluded) with the best mean LDS, and its mean
    difference from COAR's LDS on the same held-out masks with the concepts' intervals' range."""
    rows = []
    for name, run in runs.items():
        v = run.get("lds_vs_coar")
        if v is None:
            continue
        v = v[~v["method"].isin(["ablation", "coar"])]
        for alpha, g in v.groupby("alpha"):
            means = g.groupby("variant")["lds_spearman"].mean()
            best = means.idxmax()
            b = g[g["variant"] == best]
            rows.append({"model": name, "alpha": alpha, "best estimate": best, "its LDS": round(means[best], 3),
                         "COAR's LDS": round(b["baseline_lds_spearman"].mean(), 3),
                         "difference": round(b["difference"].mean(), 3),
                         "concepts with interval > 0": f"{int((b['difference_lo'] > 0).sum())} of {len(b)}"})
    return pd.DataFrame(rows)


def localization(runs: dict[str, dict], method: str = "ablation") -> pd.DataFrame:
    """Per concept: the UNet stage (a transformer's block) with the largest share of |score| of ``method`` (true
    ablation), and that share."""
    cols = {}
    for name, run in runs.items():
        r = run["results"]
        r = r[(r["method"] == method) & (r["variant"] == method)]
        # a UNet's stages, or a transformer's blocks (all of one stage: transformer_blocks.N is the layer)
        where = "block" if r["block"].nunique() > 1 else "layer"
        mass = r.assign(a=r["score"].abs()).groupby(["concept", where])["a"].sum()
        share = mass / mass.groupby(level="concept").transform("sum")
        top = share.groupby(level="concept").idxmax().map(lambda k: k[1])
        cols[name] = {c: f"{top[c]} ({share[(c, top[c])]:.0%})" for c in top.index}
    return pd.DataFrame(cols)


def depth_and_stream(runs: dict[str, dict], method: str = "ablation") -> pd.DataFrame:
    """Per concept, where ``method``'s (true ablation's) |score| mass sits along the denoiser: the share in its
    early half (the first half of its layers in execution order: a UNet's down path and a DiT's first blocks) and,
    on a diffusion transformer whose run scored both streams, the share in the context (text) stream."""
    cols = {}
    for name, run in runs.items():
        r = run["results"]
        r = r[(r["method"] == method) & (r["variant"] == method) & (r["model_part"] != "text_encoder")]
        order = list(dict.fromkeys(r["layer"]))  # the results follow the components' execution order
        early = set(order[: len(order) // 2])
        a = r.assign(a=r["score"].abs(), early=r["layer"].isin(early), context=r["kind"].str.contains("context"))
        cells = {}
        for concept, g in a.groupby("concept"):
            total = g["a"].sum()
            cell = f"early {g.loc[g['early'], 'a'].sum() / total:.0%}"
            if g["context"].any():
                cell += f", context stream {g.loc[g['context'], 'a'].sum() / total:.0%}"
            cells[concept] = cell
        cols[name] = cells
    return pd.DataFrame(cols)


def corruption_validity(runs: dict[str, dict]) -> pd.DataFrame:
    """Per model and concept: whether causal tracing's corruption removed the concept in every noise draw (its
    ``corruption`` table), with the share of J each draw removed."""
    rows = []
    for name, run in runs.items():
        c = run.get("corruption")
        if c is None or not len(c):
            continue
        for concept, g in c.groupby("concept"):
            rows.append({"model": name, "concept": concept, "valid": bool(g["valid"].astype(bool).all()),
                         "removed per draw": ", ".join(f"{r:+.0%}" for r in g["removed"])})
    return pd.DataFrame(rows)


def erasure_best(runs: dict[str, dict]) -> pd.DataFrame:
    """Per model and concept: the method whose top-k ablations lower the concept rate most (smallest area under the
    concept-rate curve), with the area of the random order beside it."""
    rows = []
    for name, run in runs.items():
        auc = run.get("erasure_auc")
        if auc is None:
            continue
        a = auc[auc["metric"] == "concept_rate"]
        for concept, g in a.groupby("concept"):
            methods = g[g["method"] != "random"].sort_values("auc")
            rnd = g.loc[g["method"] == "random", "auc"]
            rows.append({"model": name, "concept": concept, "best": methods["method"].iat[0],
                         "area": round(methods["auc"].iat[0], 3), "random": round(rnd.iat[0], 3) if len(rnd) else None})
    return pd.DataFrame(rows)


# Findings of the README, each with the rule that decides whether it holds on a run.
def _lds(run, variant, alpha):
    a = run["accuracy_vs_cost"]
    return a[(a["variant"] == variant) & (a["alpha"] == alpha)]["lds_spearman"]


def _spear(run, method):
    c = run["correlations"]
    return c[(c["method"] == method) & (c["variant"] == method)]["spearman"]


def findings(runs: dict[str, dict]) -> pd.DataFrame:
    def first_order_single(run):
        s = _spear(run, "cad")
        return s.min() >= 0.95, f"CAD's Spearman with true ablation >= 0.95 for every concept? min {s.min():.3f}"

    def first_order_joint(run):
        cad = _lds(run, "cad", 0.2).mean()
        a = run["accuracy_vs_cost"]
        a = a[(a["alpha"] == 0.2) & ~a["method"].isin(["ablation", "cad", "coar"])]
        best = a.groupby("variant")["lds_spearman"].mean()
        return (best.max() - cad > 0.03,
                f"CAD's LDS at 20% more than 0.03 below the best beyond-first-order estimate's? CAD {cad:.3f}, "
                f"{best.idxmax()} {best.max():.3f}")

    def coar_budget(run):
        a = run["accuracy_vs_cost"]
        c = a[(a["method"] == "coar") & (a["alpha"] == 0.05)].groupby("variant").agg(
            lds=("lds_spearman", "mean"), budget=("forward_evals", "mean"))
        full = c.loc["coar"]
        half = c.drop(index="coar")["budget"].idxmax() if len(c) > 1 else None
        if half is None:
            return False, "no budget variant of COAR in the run"
        h = c.loc[half]
        return (h["lds"] < 0.9 * full["lds"],
                f"COAR's LDS at 5% with its largest smaller budget more than 10% below its full budget's? "
                f"{h['budget']:.0f} masks {h['lds']:.3f}, {full['budget']:.0f} masks {full['lds']:.3f}")

    def rate_matched(run):
        lo, hi = _lds(run, "maskgrad@0.01", 0.01).mean(), _lds(run, "maskgrad@0.01", 0.2).mean()
        lo2, hi2 = _lds(run, "maskgrad@0.2", 0.01).mean(), _lds(run, "maskgrad@0.2", 0.2).mean()
        return (lo > lo2 and hi2 > hi,
                f"maskgrad@0.01 above maskgrad@0.2 at 1% and below it at 20%? {lo:.3f} vs {lo2:.3f} at 1%, "
                f"{hi:.3f} vs {hi2:.3f} at 20%")

    def tracing_apart(run):
        s = _spear(run, "tracing")
        return (s.abs().max() < 0.5, f"causal tracing's absolute Spearman with true ablation below 0.5 for every "
                                     f"concept? max {s.abs().max():.3f}")

    rules = {"first order ranks single ablations almost exactly": first_order_single,
             "first order breaks for joint ablations of 20%": first_order_joint,
             "COAR needs about twice as many masks as components": coar_budget,
             "mask-averaged gradients are best at the rate their masks are drawn at": rate_matched,
             "causal tracing's unit scores do not track ablation effects": tracing_apart}
    rows = []
    for finding, rule in rules.items():
        row = {"finding": finding}
        for name, run in runs.items():
            try:
                holds, how = rule(run)
                row[name] = f"{'holds' if holds else 'does not hold'}: {how}"
            except (KeyError, IndexError, ValueError) as err:
                row[name] = f"not measured ({type(err).__name__}: {err})"
        rows.append(row)
    return pd.DataFrame(rows)


def report(runs: dict[str, dict]) -> str:
    parts = ["# Findings across models", ""]
    sections = [("Spearman with true ablation, mean over concepts (worst concept)", spearman_table(runs), True),
                ("LDS per held-out ablation rate, mean over concepts (worst), and cost in forward-pass equivalents per "
                 "concept", lds_table(runs), True),
                ("The best estimate against COAR, on the same held-out masks", best_versus_coar(runs), False),
                ("Where each concept lives by true ablation: the block with the largest share of |score|",
                 localization(runs), True),
                ("Early against late, and image against context stream: shares of true ablation's |score|",
                 depth_and_stream(runs), True),
                ("Does causal tracing's corruption remove each concept? (every noise draw must lower J)",
                 corruption_validity(runs), False),
                ("Erasure: the method whose top-k ablations lower the concept rate most", erasure_best(runs), False),
                ("Findings, each checked by its rule on every model", findings(runs), False)]
    for title, table, index in sections:
        if table.empty:
            continue
        if isinstance(table.columns, pd.MultiIndex):
            table = table.copy()
            table.columns = [" ".join(str(x) for x in c) for c in table.columns]
        parts += [f"## {title}", "", table.to_markdown(index=index), ""]
    return "\n".join(parts)


def main(argv=None) -> int:
    args = parse(argv)
    runs = {}
    for spec in args.runs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            print(f"error: {spec!r} is not NAME=FOLDER (e.g. concept-world=reports/cw)", file=sys.stderr)
            return 2
        try:
            runs[name] = load_run(Path(folder))
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    text = report(runs)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
