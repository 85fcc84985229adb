"""The comparison's run folder and report: tables as CSV, figures as PNG, the tidy results, ``meta.json`` and the
self-contained ``index.html`` with its sections (:func:`report_sections`) and findings
(:func:`interp.report.findings.compare_findings`)."""

from __future__ import annotations

import pandas as pd

from interp.methods.base import baseline, get, reference
from interp.report import evaluation, plots, render_report, settings_rows
from interp.report import tables as rt
from interp.report.findings import compare_findings, joint_trust
from interp.studies.compare_config import CompareConfig
from interp.studies.compare_outputs import _main_and_variants


def write_outputs(run, results, maps, tables, figures, meta, cfg: CompareConfig, extra_sections=(),
                  extra_findings=()) -> None:
    """Write the run's files through its :class:`~interp.core.runs.Run` (atomically), the report last (the run then
    marks itself complete); sections and findings of optional measurements (the erasure curves) follow the comparison's
    own."""
    for name, df in tables.items():
        run.write_csv(f"tables/{name}.csv", df)
    uris = {}
    for name, png in figures.items():
        run.write_bytes(f"figures/{name}.png", png)
        uris[name] = plots.png_to_data_uri(png)
    sections = report_sections(tables, uris, cfg) + list(extra_sections)
    summary = compare_findings(tables, n_components=meta.get("n_components")) + list(extra_findings)
    run.write_parquet("results.parquet", results)
    run.write_parquet("maps.parquet", maps)
    run.write_json("meta.json", meta)
    out = run.out
    render_report(out, title="Where does the model keep each concept? Methods vs true ablation",
                  summary=summary, sections=sections, config=meta,
                  headline=[(cap, uris[k]) for k, cap in (
                      ("accuracy-vs-cost", "Accuracy on held-out joint ablations against cost, every method and "
                                           "variant (lines join budgets of one estimator)"),
                      ("localization-headline", "Where each concept lives, by the reference and by the estimator "
                                                "trusted for joint ablations (one colour scale)")) if k in uris],
                  settings=settings_rows(meta, skip=("methods", "seconds_this_run")),
                  settings_text="Per-method metadata and per-method wall times are in the raw JSON below and in "
                                "meta.json.")


def report_sections(tables, uris, cfg: CompareConfig) -> list[dict]:
    """Sections after the findings and headline figures: the main methods in the main tables and figures, budget and
    rate variants (rows whose ``variant`` is not the method's main estimate) and the full tidy tables in collapsed
    blocks."""
    def fig(name, caption):
        return [(caption, uris[name])] if name in uris else []

    corr, acc = tables["correlations"], tables["accuracy_vs_cost"]
    wall = tables["wall_time"]  # the wall time of a method run is its main estimate's
    cost = tables["cost"].merge(wall.assign(variant=wall["method"]), on=["concept", "method", "variant"], how="left")
    main, variants = _main_and_variants(pd.concat([corr, acc]))
    trusted = joint_trust(acc).get("trusted")
    joint_main = main + ([trusted] if trusted in variants else [])
    scatter = [f for c in cfg.concepts for f in fig(f"scatter-{c}", f"'{c}': the main methods against true ablation")]
    scatter_v = [f for c in cfg.concepts for f in fig(f"scatter-variants-{c}", f"'{c}': budget and rate variants")]
    single = {
        "title": "Single ablations: agreement with true ablation",
        "text": "Spearman correlation of each method's component scores with the measured effect of ablating each "
                "component alone (true ablation), with a bootstrap 95% interval over components, and the method's "
                "cost per concept in forward-pass equivalents over the evaluation set (a backward pass counts as "
                "two).",
        "tables": [("Spearman correlation with true ablation [95% CI], main methods",
                    rt.correlation_pivot(corr, [m for m in main if m != reference()], cost))],
        "figures": scatter[:1],
        "details": [
            {"title": f"Scatter plots of the main methods, every concept ({len(scatter)})", "figures": scatter[1:],
             "text": "Each panel shares its axes with the others of its concept: every method estimates the same "
                     "effect on J."} if len(scatter) > 1 else None,
            {"title": "Per concept: the method that agrees best",
             "text": "\n\n".join(evaluation.summary_sentences(corr))},
            {"title": f"Budget and rate variants ({len(variants)})",
             "tables": [("Spearman correlation with true ablation [95% CI], variants",
                         rt.correlation_pivot(corr, variants, cost))], "figures": scatter_v} if variants else None,
            {"title": "Full correlation table (Pearson, Spearman, Kendall with 95% CIs; every method)",
             "tables": [("Correlation with true ablation", corr)]},
            {"title": "Correlation per layer", "tables": [("Correlation per layer", tables["correlations_by_layer"])]},
            {"title": "Top-k agreement", "text": "Precision of each method's top-k components against the true top-k.",
             "tables": [("Top-k precision", tables["topk"])]},
        ],
    }
    b = baseline()
    B = get(b).label or b
    vs = tables.get(f"lds_vs_{b}")
    explained = " ".join(get(m).variants_help for m in cfg.methods if get(m).variants_help)
    joint = {
        "title": "Joint ablations: linear datamodeling score",
        "text": "How well each method's summed scores predict J after ablating random sets of components together "
                f"(the linear datamodeling score, LDS: Spearman over {cfg.heldout_masks} held-out masks per concept "
                "at each ablation rate \u03b1, never seen by any method). The accuracy-vs-cost figure at the top "
                "plots these rows with their variants.",
        "tables": [("LDS: mean over concepts (lowest concept), main methods"
                    + (f" and {trusted}" if trusted in variants else ""), rt.lds_pivot(acc, joint_main))]
                  + ([(f"{trusted}'s LDS minus {B}'s on the same masks [paired bootstrap 95% interval]; an "
                       "interval containing 0 is a tie", rt.versus_pivot(vs, trusted))]
                     if vs is not None and trusted in set(vs["variant"]) else []),
        "details": [
            {"title": f"Budget and rate variants ({len(variants)})",
             "text": explained,
             "tables": [("LDS of the variants: mean over concepts (lowest concept)", rt.lds_pivot(acc, variants))]}
            if variants else None,
            {"title": "Full LDS table (every concept, method and rate; Spearman and Pearson)",
             "tables": [("LDS on held-out joint ablations", tables["lds"])]},
            {"title": f"LDS minus {B}'s, every method",
             "tables": [(f"LDS minus {B}'s on the same masks, paired bootstrap 95% interval over masks", vs)]}
            if vs is not None else None,
        ],
    }
    where = {
        "title": "Where the concept lives",
        "text": "Per method, the share of each concept's attribution mass in every layer: positive (supporting) "
                "and negative (suppressing) components separately, all methods on one colour scale.",
        "figures": fig("localization-all", "Attribution mass per layer x concept, every main method"),
        "details": [],
    }
    mapped = [m for m in cfg.methods if get(m).capabilities.maps and f"maps-{m}-unet" in uris]
    corruption = tables.get("corruption")

    def corruption_rows(m):
        if corruption is None or m not in set(corruption["method"]):
            return []
        return [("Does the corruption remove the concept? Share of J each noise draw removes (a valid corruption "
                 "lowers J in every draw; where it does not, the restored fractions are not the concept's)",
                 corruption[corruption["method"] == m].drop(columns="method"))]

    maps_sections = [{
        "title": f"Maps: {m}",
        "text": f"{m}'s score per UNet layer x timestep and per text-encoder layer x token position (0 = the last "
                "subject token), all concepts on one colour scale. For causal tracing the score is the fraction of "
                "the concept restored by the clean state of one layer after the subject tokens are corrupted.",
        "tables": corruption_rows(m),
        "details": [{"title": f"{m}: UNet layer x timestep, text-encoder layer x token",
                     "figures": fig(f"maps-{m}-unet", f"{m} in the UNet") + fig(f"maps-{m}-text",
                                                                              f"{m} in the text encoder")}],
    } for m in mapped]
    cost_section = {
        "title": "Cost",
        "text": "Forward and backward passes over the evaluation set (a backward counts as two forwards in "
                "'forward_equivalents') and wall time, mean over concepts.",
        "tables": [("Cost per method, main methods: mean per concept", rt.cost_pivot(cost, main))],
        "details": [{"title": "Cost of every method and variant, per concept", "tables": [("Cost", cost)]}],
    }
    sections = [single, joint, where, *maps_sections, cost_section]
    for s in sections:
        s["details"] = [d for d in s.get("details", []) if d]
    return sections
