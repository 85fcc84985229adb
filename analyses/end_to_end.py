"""From one denoising step to the image: which component kind and which objective predict what the model draws.

    python -m analyses.end_to_end --plan                            # what the whole matrix costs, nothing run
    python -m analyses.end_to_end                                   # the pixel model, red circle striped
    python -m analyses.end_to_end --kinds ff-out attn2-value --objectives one-step high-band --methods cad ablation

For every cell of the matrix component kind x objective, the command ranks the kind's components with each method
on that objective and runs the erasure curves (``analyses.erasure_curves``: the top-k ablated jointly, held-out
images judged): the end-to-end prediction of the concept rate (Spearman of a method's summed scores with the
measured drop over its top-k sets and random joint masks, with a bootstrap interval), the area under the
concept-rate curve, and the best point (the most points erased with at least 90% of every other value retained on
average, and its artifact rate). Every cell is a complete erasure run folder under ``<out>/cells/``; one cache
(``<out>/cache``) is shared by all, so a rerun or an interrupted run reuses every finished ranking and measurement.
It writes ``matrix.csv`` (one row per cell, method and concept), ``figures/matrix.png`` (the best prediction per
cell) and a report, ``index.html``, that leads with the matrix. Expected failures print one line and exit with code 2.

Component kinds (``--kinds``): ff-out (feed-forward output neurons), ff-hidden (GEGLU hidden units), attn2-value
(cross-attention value neurons), attn2-heads (cross-attention heads), token-kv (each cross-attention head's key and
value at the concept's tokens, replaced by the anchor prompt's when ablated: interp.core.tokens), token-span (the same
heads at the concept's tokens and every later context position, each replaced by the anchor's at the aligned
position), text-mlp (text-encoder MLP output units), and features (the latents of the sparse autoencoders given with
--sae; not in the default matrix).
Objectives (``--objectives``): one-step (the erase objective at timesteps 250 and 600), high-band (700, 800, 900:
the noisy steps where layout and colour are decided), low-band (100, 200, 300) and generation (the judge's
probability of the concept on images generated through the whole loop: the classifier objective).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

import interp
from analyses import erasure_curves
from analyses._cli import apply_threads, config_parser, parse_config, quiet_if_asked, run_or_exit
from analyses.erasure_curves import ErasureCurvesConfig
from interp.core.runs import Run
from interp.core.store import config_hash
from interp.report import render_report, settings_rows
from interp.report.plots import fig_to_png, png_to_data_uri
from interp.studies.compare_config import DEVICES, PRECISIONS, check_fields, opt, select_components
from interp.studies.plan import format_duration

#: Component kinds of the matrix: (granularity, families, kinds).
KINDS = {
    "ff-out": ("neuron", ("ff",), ("ff.net.2",)),
    "ff-hidden": ("neuron", ("ff",), ("ff.net.0",)),
    "attn2-value": ("neuron", ("attn2",), ("attn2.to_v",)),
    "attn2-heads": ("head", ("attn2",), ()),
    "token-kv": ("tokenkv", ("attn2",), ()),
    "token-span": ("tokenspan", ("attn2",), ()),
    "text-mlp": ("neuron", ("text_mlp",), ("mlp.fc2",)),
    "features": ("feature", (), ()),  # the latents of the --sae dictionaries
}
#: The kinds a matrix has when --kinds is not given (features need their SAEs: --kinds features --sae FOLDER).
DEFAULT_KINDS = tuple(k for k in KINDS if k != "features")
#: Objectives of the matrix: (objective, timesteps).
OBJECTIVES = {
    "one-step": ("erase", (250, 600)),
    "high-band": ("erase", (700, 800, 900)),
    "low-band": ("erase", (100, 200, 300)),
    "generation": ("classifier", (300,)),
}
#: The retained share of the other values a best point must keep.
RETAINED_MIN = 0.9


@dataclass(frozen=True)
class EndToEndConfig:
    """The matrix's cells and the erasure measurement of each; its hash names the run folder."""

    model: str = opt("concept-world", "'concept-world' (shipped) or a concept-world folder")
    concepts: tuple[str, ...] = opt(("red", "circle", "striped"), "concepts to erase")
    kinds: tuple[str, ...] = opt(DEFAULT_KINDS, "component kinds of the matrix (features: with --sae)",
                                 choices=tuple(KINDS))
    sae: tuple[str, ...] = opt((), "folders of sparse autoencoders (written by analyses.train_sae): their latents are "
                                   "the components of the features kind", nargs="*", metavar="FOLDER")
    objectives: tuple[str, ...] = opt(tuple(OBJECTIVES), "objectives of the matrix", choices=tuple(OBJECTIVES))
    methods: tuple[str, ...] = opt(("cad", "maskgrad"), "methods whose rankings are ablated (ablation, true "
                                                        "ablation's ranking, costs a pass per component: see --plan)")
    blocks: tuple[str, ...] = opt((), "UNet stages to include (empty: all)", nargs="*")
    k: tuple[int, ...] | None = opt((1, 4, 16, 64), "numbers of jointly ablated components (values beyond a "
                                                    "cell's components are left out; none: 1, 2, 4, ... up to half "
                                                    "the set)")
    attr_images: int = opt(4, "images of the attribution objective")
    gen_steps: int = opt(10, "denoising steps of the generation objective's images")
    random_rankings: int = opt(1, "seeded random orders of the baseline")
    random_masks: int = opt(12, "random joint masks of the end-to-end prediction test")
    images: int = opt(48, "held-out images per concept")
    steps: int = opt(10, "denoising steps of the evaluation")
    n_boot: int = opt(1000, "bootstrap resamples, >= 100")
    seed: int = opt(0, "seed of everything random")
    max_batch: int = opt(256, "UNet rows per pass, >= 1")
    device: str = opt("auto", "device: auto (CUDA, else MPS, else CPU), cpu, cuda or mps", choices=DEVICES)
    dtype: str = opt("float32", "precision of the forward passes", choices=PRECISIONS, flags=("--precision",),
                     hidden_flags=("--dtype",))

    def __post_init__(self):
        check_fields(self)
        for name in ("concepts", "kinds", "objectives", "methods"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"--{name} must be non-empty and distinct, got {list(values)}")
        if ("features" in self.kinds) != bool(self.sae):
            raise ValueError("--kinds features needs the sparse autoencoders: pass --sae FOLDER (written by python -m "
                             "analyses.train_sae)" if self.sae == () else
                             "--sae is used with --kinds features: add it or drop --sae")
        self.cell(self.kinds[0], self.objectives[0], Path("."))  # the erasure config checks the rest now

    def to_dict(self) -> dict:
        """The fields as a dict: what the run folder's hash and ``meta.json`` are made of."""
        return asdict(self)

    def cell(self, kind: str, objective: str, store: Path, n_components: int | None = None):
        """The erasure-curves config of one cell (every cell shares the cache ``store``); with the cell's component
        count, the k values beyond it are left out (kinds differ in size: 28 heads, 1792 hidden units), and a cell
        with none left gets the default grid."""

        granularity, families, kinds = KINDS[kind]
        obj, timesteps = OBJECTIVES[objective]
        return ErasureCurvesConfig(
            model=self.model, concepts=self.concepts, methods=self.methods, store=str(store),
            granularity=granularity, sae=self.sae if granularity == "feature" else (),
            families=families or ("ff",), kinds=kinds, blocks=self.blocks, objective=obj,
            attr_images=self.attr_images, timesteps=timesteps, gen_steps=self.gen_steps, max_batch=self.max_batch,
            k=self.cell_k(n_components), random_rankings=self.random_rankings, random_masks=self.random_masks,
            images=self.images, steps=self.steps, n_boot=self.n_boot, seed=self.seed, device=self.device,
            dtype=self.dtype)

    def cell_k(self, n_components: int | None) -> tuple[int, ...] | None:
        """``k`` without the values beyond ``n_components`` (None: all of them; none left: the default grid)."""
        if self.k is None or n_components is None:
            return self.k
        return tuple(k for k in self.k if k <= n_components) or None


def cell_size(cfg: EndToEndConfig, kind: str, objective: str, model) -> int:
    """How many components a cell ranks on ``model`` (its kind's selection)."""
    return len(select_components(model, erasure_curves.ranking_config(cfg.cell(kind, objective, Path(".")), None)))


def cell_rows(kind: str, objective: str, tables: dict) -> list[dict]:
    """One row per method and concept of a cell: the end-to-end prediction of the concept rate, the area under the
    concept-rate curve, and the best point (most points erased with the other values retained on average by at
    least :data:`RETAINED_MIN`)."""
    pred = tables["prediction"]
    pred = pred[pred["target"] == "concept_rate"].set_index(["method", "concept"])
    auc = tables["auc"]
    auc = auc[auc["metric"] == "concept_rate"].set_index(["method", "concept"])
    # the curves' mean rates per method and k (k = 0: the unedited model)
    curves = tables["curves"].pivot_table(index=["concept", "method", "k"], columns="metric", values="value")
    rows = []
    for (method, concept), p in pred.iterrows():
        mine = curves.loc[(concept, method)]
        base = float(mine.loc[0, "concept_rate"])
        kept = mine[(mine.index > 0) & (mine["retained_rate"] >= RETAINED_MIN)]
        best = kept["concept_rate"].idxmin() if len(kept) else None
        rows.append({
            "kind": kind, "objective": objective, "method": method, "concept": concept,
            "prediction_spearman": p["spearman"], "prediction_lo": p["lo"], "prediction_hi": p["hi"],
            "auc": auc.loc[(method, concept), "auc"] if (method, concept) in auc.index else float("nan"),
            "concept_rate": base, "best_k": best,
            "points_erased": float("nan") if best is None else 100 * (base - float(kept.loc[best, "concept_rate"])),
            "retained": float("nan") if best is None else float(kept.loc[best, "retained_rate"]),
            "artifacts": float("nan") if best is None else float(kept.loc[best, "artifact_rate"]),
        })
    return rows


def matrix_figure(matrix):
    """Heatmaps kind x objective: the best end-to-end prediction (Spearman, the best method, mean over concepts)
    and the most points erased at >= 90% retained (the best method, mean over concepts)."""

    fig = Figure(figsize=(10, 0.6 * matrix["kind"].nunique() + 2.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (col, title, cmap) in zip(axes, (("prediction_spearman", "end-to-end prediction (Spearman)", "viridis"),
                                             ("points_erased", "points erased at >= 90% retained", "magma"))):
        per = matrix.groupby(["kind", "objective", "method"])[col].mean().groupby(["kind", "objective"]).max()
        grid = per.unstack("objective")
        sns.heatmap(grid, ax=ax, annot=True, fmt=".2f" if col == "prediction_spearman" else ".0f", cmap=cmap,
                    cbar=False)
        ax.set_title(f"{title}, best method, mean over concepts", fontsize=9)
        ax.set_xlabel("objective")
        ax.set_ylabel("component kind")
    return fig


def plan(cfg: EndToEndConfig, model=None) -> tuple[str, pd.DataFrame]:
    """The matrix's cost plan: each cell's erasure plan (:func:`analyses.erasure_curves.plan`: its rankings' methods,
    then its ablation sets' generations and J), the first cell's measured passes reused for the others. Returns the
    text ``--plan`` prints and the table (one row per cell)."""
    if model is None:
        model = interp.load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    rows, passes, first = [], None, None
    for kind in cfg.kinds:
        for objective in cfg.objectives:
            ecfg = cfg.cell(kind, objective, Path("."), cell_size(cfg, kind, objective, model))
            p = erasure_curves.plan(ecfg, None, model, passes)
            passes, first = passes or p.passes, first or p
            total = p.totals().loc["TOTAL"]
            rows.append({"kind": kind, "objective": objective, "components": p.n_components,
                         "unet_rows": int(total["unet_rows"]), "seconds": float(total["seconds"])})
    table = pd.DataFrame(rows)
    show = table.assign(unet_rows=table["unet_rows"].map("{:,}".format),
                        projected=table["seconds"].map(format_duration)).drop(columns="seconds")
    text = "\n".join([
        f"Plan: the end-to-end matrix on {cfg.model}, {len(rows)} cells x methods {list(cfg.methods)} x concepts "
        f"{list(cfg.concepts)}", *first.format().splitlines()[1:3],
        "per cell (the passes above, measured on the first cell, project every cell; each cell: its rankings' "
        "methods, then at most every ablation set's held-out generation and J):", show.to_string(index=False),
        f"TOTAL: {table['unet_rows'].sum():,} UNet rows, projected {format_duration(table['seconds'].sum())} "
        f"(UNet passes only; a top-k set that repeats an earlier one is read from the cache)"])
    return text, table


def run(cfg: EndToEndConfig, out: Path, log) -> dict:
    """The plan's projection first, then every cell's erasure run, the matrix, its figure and the report."""

    model = interp.load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    text, table = plan(cfg, model)
    log(text)
    with Run(out, cfg.to_dict(), "end-to-end") as r:
        rows, seconds = [], {}
        for kind in cfg.kinds:
            for objective in cfg.objectives:
                t0 = time.perf_counter()
                ecfg = cfg.cell(kind, objective, r.cache, cell_size(cfg, kind, objective, model))
                result = erasure_curves.run(ecfg, out / "cells" / f"{kind}__{objective}", None, log)
                rows += cell_rows(kind, objective, result["tables"])
                seconds[f"{kind}/{objective}"] = time.perf_counter() - t0
                log(f"cell {kind} x {objective} in {seconds[f'{kind}/{objective}']:.0f} s")
        matrix = pd.DataFrame(rows)
        r.write_csv("matrix.csv", matrix)
        png = fig_to_png(matrix_figure(matrix))
        r.write_bytes("figures/matrix.png", png)
        meta = r.metadata(seconds=seconds, retained_min=RETAINED_MIN,
                          projected_seconds=dict(zip(table["kind"] + "/" + table["objective"], table["seconds"])))
        r.write_json("meta.json", meta)
        best = matrix.sort_values("prediction_spearman", ascending=False).groupby("concept").head(1)
        summary = [f"'{b.concept}': the best end-to-end prediction is {b.method} on {b.kind} with the {b.objective} "
                   f"objective, Spearman {b.prediction_spearman:.2f} [{b.prediction_lo:.2f}, {b.prediction_hi:.2f}]; "
                   f"its best point erases {b.points_erased:.0f} points at {b.retained:.0%} retained."
                   for b in best.itertuples()]
        render_report(r.out, title="From one step to the image: which components and which objective predict it?",
                      summary=summary, headline=[("Component kind x objective: the best method's end-to-end "
                                                  "prediction and erasure, mean over concepts", png_to_data_uri(png))],
                      sections=[{"title": "The matrix", "text": "One row per cell, method and concept; every cell's "
                                 "own erasure report is under cells/.", "tables": [("Matrix", matrix)]}],
                      config=meta, settings=settings_rows(meta, skip=("seconds",)))
        r.complete()
    return {"matrix": matrix, "meta": meta}


def build_parser() -> argparse.ArgumentParser:
    """EndToEndConfig's fields, plus --out, --threads and --no-progress."""

    return config_parser("end_to_end", __doc__, EndToEndConfig,
                         "run folder (default reports/end-to-end-<config hash>)", plan=True)


def main(argv=None) -> int:
    parser = build_parser()
    args, cfg = parse_config(parser, EndToEndConfig, argv)
    apply_threads(parser, args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.plan:
        with quiet_if_asked(args):
            print(run_or_exit(parser, None, lambda: plan(cfg))[0])
        return 0
    out = args.out or Path("reports") / f"end-to-end-{config_hash(cfg.to_dict())[:10]}"
    with quiet_if_asked(args):
        result = run_or_exit(parser, out, lambda: run(cfg, out, logging.info))
    logging.info("\n%s", result["matrix"].groupby(["kind", "objective", "method"])[
        ["prediction_spearman", "points_erased"]].mean().round(3).to_string())
    logging.info("report: %s", (out / "index.html").resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
