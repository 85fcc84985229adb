"""The comparison's tables and figures, made from its tidy results and held-out ablations (:mod:`interp.studies.compare`
caches them under the source digest of this module and the ones it uses:
:func:`interp.studies.compare.derived_code_digest`).

Every table reads the registry for its structure (the reference, the LDS baseline, labels), never a method name.
"""

from __future__ import annotations

import pandas as pd

from interp.core.results import is_main
from interp.methods.base import baseline, get, reference
from interp.report import evaluation, plots
from interp.report.findings import joint_trust
from interp.studies.compare_config import CompareConfig


def _without_attrs(df: pd.DataFrame) -> pd.DataFrame:
    """A shallow copy without ``attrs``: pandas deep-copies ``attrs`` (here every method's run metadata) in every
    operation that derives a frame, which made the tables' bootstrap loops spend half their time copying it."""
    bare = df.copy(deep=False)
    bare.attrs = {}
    return bare


def build_tables(results: pd.DataFrame, heldout: dict, cfg: CompareConfig) -> dict[str, pd.DataFrame]:
    full, results = results, _without_attrs(results)
    t = {}
    t["correlations"] = evaluation.correlations(results, n_boot=cfg.n_boot, seed=cfg.seed)
    t["correlations_by_layer"] = evaluation.correlations_by_layer(results, n_boot=200, seed=cfg.seed)
    t["topk"] = evaluation.topk_agreement(results)
    t["lds"] = evaluation.lds_table(results, heldout, missing="raise")
    b = baseline()
    if b in cfg.methods:  # "never worse than COAR?" needs the noise of 64 held-out masks next to the difference
        t[f"lds_vs_{b}"] = evaluation.lds_versus(results, heldout, b, n_boot=cfg.n_boot, seed=cfg.seed)
    corruption = evaluation.corruption_table(full)  # does causal tracing's corruption remove each concept?
    if len(corruption):
        t["corruption"] = corruption
    cost = evaluation.cost_table(full)  # reads the run metadata in attrs, the variants' costs included
    cost["forward_equivalents"] = cost["forward_evals"] + 2 * cost["backward_evals"]
    # Passes are a property of the configuration (a resumed run reports the same); wall time is not: its own table.
    t["wall_time"] = cost.loc[cost["seconds"].notna(), ["concept", "method", "seconds"]].reset_index(drop=True)
    t["cost"] = cost.drop(columns="seconds")
    keys = ["concept", "method", "variant"]
    acc = t["lds"].merge(cost[keys + ["forward_equivalents"]], on=keys, how="left")
    acc = acc.rename(columns={"forward_equivalents": "forward_evals"})
    # the estimate's typed columns: budget variants of one estimator form one curve in the plot
    estimates = results[["method", "variant", "estimator", "budget", "mask_alpha"]].drop_duplicates(keys[1:])
    acc = acc.merge(estimates, on=keys[1:], how="left")
    lead = keys + ["estimator", "budget", "mask_alpha"]
    t["accuracy_vs_cost"] = acc[lead + [c for c in acc.columns if c not in lead]]
    return t


def build_figures(results: pd.DataFrame, maps: pd.DataFrame, tables: dict, cfg: CompareConfig) -> dict[str, object]:
    """The report's figures: the headline (accuracy vs cost; localization of the reference beside the estimator
    trusted for joint ablations), small multiples of the main methods (budget and rate variants apart, for the
    collapsed evidence), every method's localization on one colour scale, and the maps (of the methods with the
    ``maps`` capability: causal tracing) of all concepts."""
    figs = {}
    main, variants = _main_and_variants(results)
    figs["accuracy-vs-cost"] = plots.accuracy_vs_cost(tables["accuracy_vs_cost"])
    trusted = joint_trust(tables["accuracy_vs_cost"]).get("trusted")
    ref = reference()
    pair = [ref] + ([trusted] if trusted and trusted != ref else [])
    figs["localization-headline"] = plots.localization_grid(
        results, pair, title=f"where the concept lives: {get(ref).label}"
        + (f" beside {trusted}, trusted for joint ablations" if len(pair) > 1 else "") + " (share of |score| per layer)")
    # methods with maps score on their own scale (tracing: restored fractions): their panels come last
    figs["localization-all"] = plots.localization_grid(results, sorted(main, key=lambda m: get(m).capabilities.maps))
    for m in main:  # one file per method for reuse outside the report (the page shows localization-all)
        figs[f"localization-{m}"] = plots.localization_heatmap(results, m)
    for c in cfg.concepts:
        figs[f"scatter-{c}"] = plots.scatter_vs_reference(results, c, methods=main)
        if variants:
            figs[f"scatter-variants-{c}"] = plots.scatter_vs_reference(results, c, methods=variants)
    for m in sorted(set(maps["method"])):
        for c in cfg.concepts:
            figs[f"maps-{m}-unet-{c}"] = plots.trace_map_unet(maps, c, method=m)
            figs[f"maps-{m}-text-{c}"] = plots.trace_map_text(maps, c, method=m)
        figs[f"maps-{m}-unet"] = plots.trace_maps(maps, cfg.concepts, "unet", method=m)
        figs[f"maps-{m}-text"] = plots.trace_maps(maps, cfg.concepts, "text_encoder", method=m)
    return figs


def _main_and_variants(frame: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The variant names of a results frame or table, in order of appearance: methods' main estimates, and the
    budget and rate variants."""
    pairs = frame[["method", "variant"]].drop_duplicates()
    main = is_main(pairs)
    return list(pairs.loc[main, "variant"]), list(pairs.loc[~main, "variant"])
