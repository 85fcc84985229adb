"""The main job: every method on the same components, objective and samples, checked against true ablation.

:func:`run_comparison` runs methods x concepts on one component set (small enough that true ablation is exhaustive
over it), measures held-out joint ablations at several ablation rates for the linear datamodeling score, and writes
one run folder: ``results.parquet`` (tidy), ``maps.parquet`` (the maps of methods that make them: causal tracing's
layer x timestep and layer x token), ``meta.json`` (config, versions, machine, wall time per method),
``tables/*.csv``, ``figures/*.png`` and a self-contained ``index.html``. Every computation is cached under a hash of
its configuration in ``<run>/cache``, so a re-run reuses it and an interrupted run resumes; the results and the
report are written last, and removed at the start of a run, so a folder never holds a report that looks complete
but is not.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import evaluation, plots
from .compare_config import DEFAULT_METHODS, CompareConfig  # noqa: F401  (re-exported)
from .methods.base import components_hash, get
from .engine import masked_values, random_masks
from .objectives import Objective
from .report import render_report, settings_rows
from .report.findings import compare_findings
from .results import concat, empty_maps, is_main
from .runs import Run, check_finite_weights, check_memory
from .store import Store, atomic_write_bytes, atomic_write_text, frame_to_parquet_bytes


def select_components(model, cfg: CompareConfig):
    """The components a comparison attributes: ``cfg.components`` by address, else the model's components of
    ``cfg.granularity`` filtered by ``cfg.families``, ``cfg.kinds`` and ``cfg.blocks``.

    Args:
        model: the loaded model.
        cfg: the comparison's :class:`~interp.compare_config.CompareConfig`.

    Returns:
        A :class:`~interp.components.ComponentSet` (possibly empty: the caller refuses that).

    Raises:
        interp.components.UnknownComponentError: an address names no component (with the nearest valid ones).
    """
    if getattr(cfg, "components", ()):  # named addresses (unknown ones fail with the nearest valid ones)
        from .components import ComponentSet

        return ComponentSet([model.space.parse(a) for a in cfg.components])
    filters = {"family": list(cfg.families) or None, "kind": list(cfg.kinds) or None,
               "block": list(cfg.blocks) or None}
    return model.components(cfg.granularity, **{k: v for k, v in filters.items() if v})


def heldout_ablations(obj, comps, alpha: float, n_masks: int, seed: int, store: Store, progress=False,
                      executor=None) -> dict:
    """J under fresh random joint ablations at rate ``alpha`` (never seen by any method): the LDS test set.

    Cached under everything J depends on (:meth:`Objective.identity`), the full component list and the masks' rate,
    count and seed."""
    masks = random_masks(n_masks, len(comps), alpha, seed + 99_991 + int(round(alpha * 10_000)))
    key = {"heldout": alpha, "n": n_masks, "seed": seed, **obj.identity(), "components": components_hash(comps),
           "n_components": len(comps)}
    entry = store.entry(f"heldout-{obj.concept.name}", key)
    J = masked_values(obj, comps, masks, entry=entry, chunk=32, progress=progress, tag=f"heldout a={alpha}",
                      executor=executor)
    return {"masks": masks.numpy().astype(float), "components": comps.addresses, "j": J.double().mean(1).numpy(),
            "j_intact": float(obj.intact.double().mean())}


def check_concept_words(model: str, concepts) -> None:
    """On a model kind with its own concepts (the concept world, by name or folder), refuse unknown concept words
    before the model loads."""
    from .models import model_kind

    kind = model_kind(model)
    if kind is not None and hasattr(kind.provider, "check_concept_words"):
        kind.provider.check_concept_words(concepts)


def estimate_memory(cfg: CompareConfig, n: int, sample_numel: int) -> dict[str, float]:
    """Bytes the largest allocations of a run need, by part (an estimate, to refuse hopeless configurations early)."""
    C, A = len(cfg.concepts), len(cfg.lds_alphas)
    coar_m = cfg.coar_masks or 2 * n
    samples = cfg.n_images * len(cfg.timesteps)
    return {
        # float64 masks kept for every (concept, rate), plus the float32 draw, bool mask and a float64 copy while built
        "held-out masks (--heldout-masks x components)": cfg.heldout_masks * n * (8 * C * A + 21),
        # float32 draw, bool mask, float64 design matrix and its train/test copies, the least-squares matrix
        "COAR masks (--coar-masks x components)": coar_m * n * 29 if "coar" in cfg.methods else 0,
        # renders, noise, noised images and targets of the evaluation set, and the prompts
        "evaluation set (--images x timesteps)": samples * sample_numel * 4 * 6 + cfg.n_images * 400,
    }


def run_comparison(cfg: CompareConfig, out_dir: str | Path, progress: bool = True, log=None, executor=None) -> dict:
    """Run the comparison and write the run folder; returns the frames and tables. ``executor``: where the sweeps
    run (:mod:`interp.executors`; default this process); it changes no result, so it is not part of the config.

    Everything that can be checked before work is: the config on construction, the concept words before the model
    loads, then the weights (finite), the component selection (non-empty), the memory the configuration needs, every
    method's options and the objective (timesteps in the scheduler's range) before any method runs."""
    from .diffusion import latent_shape
    from .models import load_model

    say = log or (lambda msg: None)
    check_concept_words(cfg.model, cfg.concepts)
    with Run(out_dir, cfg.to_dict(), "compare") as run:
        store = Store(run.cache)
        t0 = time.perf_counter()
        model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        say(f"model {cfg.model} loaded in {time.perf_counter() - t0:.1f} s ({model.device}, {model.dtype})")
        check_finite_weights(model, cfg.model)
        comps = select_components(model, cfg)
        if len(comps) == 0:
            raise ValueError(f"no {cfg.granularity} components match families {list(cfg.families)}, kinds "
                             f"{list(cfg.kinds)}, blocks {list(cfg.blocks)}: widen --families/--kinds/--blocks")
        parts = estimate_memory(cfg, len(comps), int(np.prod(latent_shape(model, 1))))
        biggest = max(parts, key=parts.get)
        check_memory(sum(parts.values()), f"this configuration ({len(comps)} components; most for the {biggest})",
                     "lower the counts named there")
        methods = {m: get(m)(**cfg.method_options(m, len(comps))) for m in cfg.methods}  # options checked now
        erasure = erasure_setup(model, comps, cfg) if cfg.erasure_k else None  # k, judge, values: checked now
        say(f"{len(comps)} components ({cfg.granularity}, kinds {list(cfg.kinds)}), {len(cfg.concepts)} concepts, "
            f"methods {list(cfg.methods)}")
        frames, map_frames, heldout, seconds = [], [], {}, {}
        ocfg = cfg.objective_config()
        objectives = {c: Objective(model, concept_spec(model, c, cfg), ocfg)  # every evaluation set checked first
                      for c in cfg.concepts}
        from .plan import preflight_run

        preflight_run(model, comps, ocfg, cfg.methods, max(2 * len(comps), cfg.coar_masks, cfg.heldout_masks), say)
        for concept, obj in objectives.items():
            for method, m in methods.items():
                t0 = time.perf_counter()
                df = m.attribute(model, concept, comps, objective=obj, store=store, progress=progress,
                                 executor=executor)
                if m.capabilities.maps:  # the same run's maps (kept by the method object, no second run)
                    map_frames.append(m.maps(model, concept, comps, objective=obj, store=store, executor=executor))
                seconds[f"{method}/{concept}"] = time.perf_counter() - t0
                frames.append(df)
                say(f"{concept}: {method} done in {seconds[f'{method}/{concept}']:.1f} s")
            t0 = time.perf_counter()
            for alpha in cfg.lds_alphas:
                heldout[(concept, alpha)] = heldout_ablations(obj, comps, alpha, cfg.heldout_masks, cfg.seed, store,
                                                              progress, executor)
            say(f"{concept}: held-out joint ablations ({cfg.heldout_masks} masks x {len(cfg.lds_alphas)} rates) done "
                f"in {time.perf_counter() - t0:.1f} s")
            obj.release()  # this concept's replay cache: one concept's is held at a time
        results = concat(frames)
        maps = pd.concat(map_frames, ignore_index=True) if map_frames else empty_maps()
        tables, figures = derived_outputs(results, maps, heldout, cfg, store, say)
        extra = {}
        if erasure is not None:
            t0 = time.perf_counter()
            extra = erasure_curves(model, comps, results, cfg, erasure, store, say)
            tables.update({f"erasure_{name}": df for name, df in extra["tables"].items()})
            figures["erasure-curves"] = extra["figure_png"]
            seconds["erasure curves"] = time.perf_counter() - t0
            say(f"erasure curves (k = {list(cfg.erasure_k)}, {cfg.erasure_images} images per concept) in "
                f"{seconds['erasure curves']:.1f} s")
        meta = run.metadata(n_components=len(comps), seconds_this_run=seconds, methods=results.attrs["meta"])
        meta["wall_seconds_this_run"] = meta.pop("wall_seconds")
        write_outputs(run.out, results, maps, tables, figures, meta, cfg, extra.get("sections", ()),
                      extra.get("findings", ()))
        run.complete()
    return {"results": results, "maps": maps, "tables": tables, "meta": meta}


def derived_code_digest() -> str:
    """A digest of the source of the modules that make the tables and figures (this one, :mod:`interp.evaluation`,
    :mod:`interp.plots`, :mod:`interp.report.findings` (which estimator the headline figure shows),
    :mod:`interp.results`, whose costs the tables read, and :mod:`interp.methods.tracing`, whose corruption check the
    corruption table applies): cached tables and figures are reused only when the code that made them is unchanged,
    with no version number to remember to bump."""
    from . import results
    from .methods import tracing
    from .report import findings

    h = hashlib.sha256()
    for module in (sys.modules[__name__], evaluation, plots, findings, results, tracing):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]



def derived_outputs(results: pd.DataFrame, maps: pd.DataFrame, heldout: dict, cfg: CompareConfig, store: Store,
                    say=None):
    """Tables (with their bootstrap intervals) and figures (PNG bytes) of a run, cached in the run's store under a
    hash of the run's configuration and of the exact results they are made from: a re-run of a finished run loads
    them instead of recomputing bootstraps and re-drawing figures (which is most of a cached run's time otherwise)."""
    h = hashlib.sha256(pd.util.hash_pandas_object(results, index=False).values.tobytes())
    h.update(pd.util.hash_pandas_object(maps, index=False).values.tobytes())
    h.update(json.dumps(results.attrs.get("meta", {}), sort_keys=True, default=str).encode())
    for k in sorted(heldout, key=str):
        h.update(repr(k).encode())
        for part in ("masks", "j"):
            h.update(np.ascontiguousarray(heldout[k][part]).tobytes())
    entry = store.entry("derived", {"config": cfg.to_dict(), "content": h.hexdigest(), "code": derived_code_digest()})
    say = say or (lambda msg: None)
    files = entry.load_files()
    if files is not None:
        tables = {rel[len("tables/"):-len(".parquet")]: pd.read_parquet(io.BytesIO(b))
                  for rel, b in files.items() if rel.startswith("tables/")}
        figures = {rel[len("figures/"):-len(".png")]: b for rel, b in files.items() if rel.startswith("figures/")}
        say(f"tables and figures reused from the cache ({len(tables)} tables, {len(figures)} figures)")
        return tables, figures
    t0 = time.perf_counter()
    tables = build_tables(results, heldout, cfg)
    say(f"{len(tables)} tables with bootstrap intervals ({cfg.n_boot} resamples) in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    drawn = build_figures(_without_attrs(results), maps, tables, cfg)
    figures = {name: plots.fig_to_png(fig) for name, fig in drawn.items()}
    say(f"{len(figures)} figures in {time.perf_counter() - t0:.1f} s")
    entry.save_files({**{f"tables/{n}.parquet": frame_to_parquet_bytes(df) for n, df in tables.items()},
                      **{f"figures/{n}.png": png for n, png in figures.items()}})
    return tables, figures


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
    if "coar" in cfg.methods:  # "never worse than COAR?" needs the noise of 64 held-out masks next to the difference
        t["lds_vs_coar"] = evaluation.lds_versus(results, heldout, "coar", n_boot=cfg.n_boot, seed=cfg.seed)
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
    from .report.findings import joint_trust

    figs = {}
    main, variants = _main_and_variants(results)
    figs["accuracy-vs-cost"] = plots.accuracy_vs_cost(tables["accuracy_vs_cost"])
    trusted = joint_trust(tables["accuracy_vs_cost"]).get("trusted")
    pair = ["ablation"] + ([trusted] if trusted and trusted != "ablation" else [])
    figs["localization-headline"] = plots.localization_grid(
        results, pair, title="where the concept lives: true ablation"
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


def concept_spec(model, concept: str, cfg: CompareConfig):
    """The concept a run's objective is built on: the word itself (the concept world's own concepts, or a phrase
    with the judge's generic alternatives), or on other models with ``--alternatives`` a text concept weighed
    against them."""
    from .concepts import judged_concept

    return judged_concept(model, concept, cfg.alternatives, n=cfg.n_images)


def erasure_setup(model, comps, cfg: CompareConfig) -> dict:
    """What the erasure curves need, checked before any method runs: the k grid against the component set, the
    judge, the values each concept is weighed against and the held-out image set."""
    from . import erasure as er
    from .editing.evaluate import EVAL_SEED, EvalConfig, images_per_call, resolve_judge

    from .concepts import weighed_against

    er.k_grid(len(comps), cfg.erasure_k)
    alternatives = {c: weighed_against(model, c, cfg.alternatives, cfg.concepts) for c in cfg.concepts}
    return {"judge": resolve_judge(model, cfg.judge), "alternatives": alternatives,
            "eval": EvalConfig.from_total(cfg.erasure_images, steps=cfg.erasure_steps, seed=EVAL_SEED + cfg.seed,
                                          guidance=cfg.guidance, batch=images_per_call(cfg.max_batch)),
            "config": er.ErasureConfig(ks=cfg.erasure_k, n_boot=cfg.n_boot, seed=cfg.seed)}


def erasure_curves(model, comps, results: pd.DataFrame, cfg: CompareConfig, setup: dict, store: Store, say) -> dict:
    """Erasure curves (:mod:`interp.erasure`) of every method's main estimate in this run, per concept."""
    from . import erasure as er
    from .editing.edits import Ranking

    rows = _without_attrs(results)
    rankings = {c: {m: Ranking.from_frame(rows[(rows["method"] == m) & (rows["concept"] == c)], name=m)
                    for m in cfg.methods} for c in cfg.concepts}
    return er.erasure_study(model, comps, rankings, cfg.objective_config(), setup["eval"], setup["config"],
                            setup["judge"], setup["alternatives"], store, say,
                            concepts={c: concept_spec(model, c, cfg) for c in cfg.concepts})


def write_outputs(out: Path, results, maps, tables, figures, meta, cfg: CompareConfig, extra_sections=(),
                  extra_findings=()) -> None:
    """Write the run's files atomically, the report last (the run layer then marks the run complete); sections and
    findings of optional measurements (the erasure curves) follow the comparison's own."""
    for name, df in tables.items():
        atomic_write_text(out / "tables" / f"{name}.csv", df.to_csv(index=False))
    uris = {}
    for name, png in figures.items():
        atomic_write_bytes(out / "figures" / f"{name}.png", png)
        uris[name] = plots.png_to_data_uri(png)
    sections = report_sections(tables, uris, cfg) + list(extra_sections)
    summary = compare_findings(tables, n_components=meta.get("n_components")) + list(extra_findings)
    atomic_write_bytes(out / "results.parquet", frame_to_parquet_bytes(results))
    atomic_write_bytes(out / "maps.parquet", frame_to_parquet_bytes(maps))
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1, default=str))
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
    from .report import tables as rt
    from .report.findings import joint_trust

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
                    rt.correlation_pivot(corr, [m for m in main if m != "ablation"], cost))],
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
    vs = tables.get("lds_vs_coar")
    joint = {
        "title": "Joint ablations: linear datamodeling score",
        "text": "How well each method's summed scores predict J after ablating random sets of components together "
                f"(the linear datamodeling score, LDS: Spearman over {cfg.heldout_masks} held-out masks per concept "
                "at each ablation rate \u03b1, never seen by any method). 'ablation' is the sum of single-ablation "
                "effects. The accuracy-vs-cost figure at the top plots these rows with their variants.",
        "tables": [("LDS: mean over concepts (lowest concept), main methods"
                    + (f" and {trusted}" if trusted in variants else ""), rt.lds_pivot(acc, joint_main))]
                  + ([(f"{trusted}'s LDS minus COAR's on the same masks [paired bootstrap 95% interval]; an "
                       "interval containing 0 is a tie", rt.versus_pivot(vs, trusted))]
                     if vs is not None and trusted in set(vs["variant"]) else []),
        "details": [
            {"title": f"Budget and rate variants ({len(variants)})",
             "text": "'coar@m' is COAR fitted on its first m masks; 'maskgrad@a' averages gradients over masks drawn "
                     "at ablation rate a, '-K4' over its first 4 masks.",
             "tables": [("LDS of the variants: mean over concepts (lowest concept)", rt.lds_pivot(acc, variants))]}
            if variants else None,
            {"title": "Full LDS table (every concept, method and rate; Spearman and Pearson)",
             "tables": [("LDS on held-out joint ablations", tables["lds"])]},
            {"title": "LDS minus COAR's, every method",
             "tables": [("LDS minus COAR's on the same masks, paired bootstrap 95% interval over masks", vs)]}
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
