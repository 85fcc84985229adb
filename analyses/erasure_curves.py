"""Erasure curves: ablate each method's top-k components jointly and judge the generated images on held-out prompts.

    python -m analyses.erasure_curves                                   # red, circle; ablation cad coar maskgrad
    python -m analyses.erasure_curves --compare reports/default --concepts red circle striped --k 1 4 16 64 224
    python -m analyses.erasure_curves --model <sd-folder> --judge <clip-folder> --concepts "van gogh" \\
        --alternatives monet picasso --kinds ff.net.0 --blocks mid_block

For every method's ranking and concept (interp.erasure): the top k components are zero-ablated together, k on a log
grid up to half the component set (or --k), and on held-out prompts and seeds the command measures the one-step J,
the judge's concept rate of the generated images and the retained rate of every other attribute value; bootstrap
bands over images, the area under the concept-rate and retained curves, a random-ranking baseline (--random-rankings
seeded orders), and how well each method's own prediction of a joint ablation (the sum of its scores) ranks the
measured drop of the concept rate across its top-k sets and --random-masks random joint masks (Spearman with a
bootstrap interval).

Targeted erasure: --rankings contrastive (a method's normalized score on the concept minus its mean over --contrast
concepts), per-layer (every top-k spread evenly over the layers) or both, next to the plain ranking; --ablation mean
replaces each ablated unit by its mean over the attribution objective's anchor prompts instead of zero.

Rankings come from an existing comparison run (--compare DIR: its results.parquet, components and objective), or are
computed with interp.attribute on the component set and objective given here (the comparison's options and defaults),
cached in --store (default: the run folder's cache; pass a comparison's cache folder to reuse its results).

Writes a run folder (default reports/erasure-<hash>/): results.parquet (the tidy curves), tables/*.csv (curves, auc,
prediction, points, per_value), figures/erasure-curves.png, meta.json, a self-contained index.html and status.json.
Expected failures print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

#: --rankings: the suffix each ranking of a method is named with
RANKINGS = {"plain": "", "contrastive": "+contrastive", "per-layer": "+per-layer",
            "contrastive-per-layer": "+contrastive+per-layer"}


def build_parser() -> argparse.ArgumentParser:
    from analyses._cli import add_method_arguments, add_no_progress_argument, add_plugin_argument, add_threads_argument
    from interp.methods import REGISTRY

    p = argparse.ArgumentParser(prog="python -m analyses.erasure_curves", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="concept-world",
                   help="'concept-world' (shipped), a concept-world folder, or a Stable Diffusion folder / hub id "
                        "(then give --judge and --alternatives; default %(default)s)")
    p.add_argument("--concepts", nargs="+", default=["red", "circle"], help="concepts to erase (default %(default)s)")
    p.add_argument("--methods", nargs="+", default=[n for n, m in REGISTRY.items() if m.default_erasure],
                   help="attribution methods whose rankings are ablated (default %(default)s)")
    add_plugin_argument(p)
    p.add_argument("--compare", type=Path, default=None,
                   help="a finished comparison run folder: read the rankings from its results.parquet and take its "
                        "components and objective (the component and objective options below are then not used)")
    p.add_argument("--store", type=Path, default=None,
                   help="cache folder of the attributions (default: <out>/cache; a comparison's cache folder reuses "
                        "its results when components, objective and options match)")
    g = p.add_argument_group("components and objective of the rankings (as in analyses.compare_methods)")
    g.add_argument("--granularity", default="neuron", choices=["layer", "neuron", "head"],
                   help="component granularity (default %(default)s)")
    g.add_argument("--families", nargs="*", default=["ff"], help="component families (default %(default)s)")
    g.add_argument("--kinds", nargs="*", default=["ff.net.2"], help="module kinds (default %(default)s)")
    g.add_argument("--blocks", nargs="*", default=[], help="UNet stages to include (default: all)")
    g.add_argument("--attr-images", type=int, default=4,
                   help="images of the attribution objective (default %(default)s)")
    g.add_argument("--timesteps", type=int, nargs="+", default=[250, 600],
                   help="timesteps of the attribution objective (default %(default)s)")
    g.add_argument("--gen-steps", type=int, default=10,
                   help="denoising steps of the attribution objective's generated images (models other than the "
                        "concept world) (default %(default)s)")
    g.add_argument("--max-batch", type=int, default=256,
                   help="UNet rows per pass, >= 1: bounds the rankings' passes and every generation call (half as "
                        "many images, at most 64, decoded together); lower it when a GPU runs out of memory "
                        "(default %(default)s)")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale of every generation: those images and the held-out images "
                        "(default: the model's)")
    t = p.add_argument_group("targeted erasure (rankings that ask for specificity; interp.erasure)")
    t.add_argument("--rankings", nargs="+", default=["plain"], choices=list(RANKINGS),
                   help="which rankings of every method to ablate: plain (its scores), contrastive (its normalized "
                        "score on the concept minus the mean over --contrast concepts), per-layer (top-k spread "
                        "evenly over the layers), contrastive-per-layer (both); named <method>+contrastive, ... "
                        "(default %(default)s)")
    t.add_argument("--contrast", nargs="+", default=None,
                   help="the concepts a contrastive score subtracts (default: on the concept world every other value "
                        "of every attribute, elsewhere the --alternatives)")
    t.add_argument("--ablation", default="zero", choices=["zero", "mean"],
                   help="zero-ablate, or replace each ablated unit by its mean over the attribution objective's "
                        "anchor prompts (the concept word left out; default %(default)s)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--judge", default=None,
                   help="image judge: 'classifier' (the concept world's, its default), 'concept-world-clip', a "
                        "CLIPModel folder or a hub id (required on other models)")
    e.add_argument("--alternatives", nargs="+", default=None,
                   help="models other than the concept world: phrases each concept is weighed against and whose "
                        "retention is measured (default: the other --concepts)")
    e.add_argument("--k", type=int, nargs="+", default=None,
                   help="numbers of jointly ablated components (default: 1, 2, 4, ... up to half the set)")
    e.add_argument("--random-rankings", type=int, default=3,
                   help="seeded random orders of the baseline (default %(default)s)")
    e.add_argument("--random-masks", type=int, default=12,
                   help="random joint masks of the end-to-end prediction test (default %(default)s)")
    e.add_argument("--mask-rates", type=float, nargs="+", default=[0.01, 0.05, 0.2],
                   help="ablation rates of the random joint masks, cycled (default %(default)s)")
    e.add_argument("--images", type=int, default=96,
                   help="held-out images per concept: 1/4 target prompts, 1/12 target alone, the rest other values "
                        "(default %(default)s)")
    e.add_argument("--steps", type=int, default=10, help="denoising steps of the evaluation (default %(default)s)")
    e.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples, >= 100 (default %(default)s)")
    e.add_argument("--seed", type=int, default=0, help="seed of everything random (default %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default reports/erasure-<config hash>)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="device (default %(default)s)")
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16", "float64"],
                   help="precision of the forward passes (default %(default)s)")
    add_threads_argument(p)
    add_method_arguments(p)
    add_no_progress_argument(p)
    return p


def check_args(parser: argparse.ArgumentParser, args) -> dict | None:
    """Refuse bad arguments before anything heavy loads; returns the comparison's config with --compare."""
    from analyses._cli import threads_error
    from interp.compare_config import check_concept_words
    from interp.methods import REGISTRY
    from interp.objectives import MAX_SEED

    def fail(msg):
        parser.exit(2, f"error: {msg}\n")

    if any(not c.strip() for c in args.concepts) or len(set(args.concepts)) != len(args.concepts):
        fail(f"concepts must be non-empty and distinct, got {args.concepts}")
    unknown = [m for m in args.methods if m not in REGISTRY]
    if unknown:
        fail(f"unknown method(s) {unknown}; registered methods are {sorted(REGISTRY)}")
    if len(set(args.methods)) != len(args.methods):
        fail(f"duplicate methods in {args.methods}")
    if args.k is not None and (not args.k or any(k < 1 for k in args.k) or len(set(args.k)) != len(args.k)):
        fail(f"--k values must be distinct integers >= 1, got {args.k}")
    if args.random_rankings < 0 or args.random_masks < 0:
        fail(f"--random-rankings and --random-masks must be >= 0, got {args.random_rankings} and {args.random_masks}")
    if args.random_masks and (not args.mask_rates or any(not 0 < a < 1 for a in args.mask_rates)):
        fail(f"--mask-rates must lie in (0, 1), got {args.mask_rates}")
    if args.images < 3 or args.steps < 1 or args.attr_images < 1 or args.gen_steps < 1 or args.max_batch < 1:
        fail("--images must be >= 3, --steps, --attr-images, --gen-steps and --max-batch >= 1")
    if args.guidance is not None and not 0 <= args.guidance < 1e4:
        fail(f"--guidance must be a scale >= 0 (1: unguided), got {args.guidance}")
    if args.n_boot < 100:
        fail(f"--n-boot must be >= 100 for a 95% interval, got {args.n_boot}")
    if len(set(args.rankings)) != len(args.rankings):
        fail(f"duplicate --rankings in {args.rankings}")
    if args.contrast is not None and any(c in args.concepts for c in args.contrast) and len(args.concepts) == 1:
        fail(f"--contrast {args.contrast} lists the concept being erased")
    if threads_error(args.threads):
        fail(threads_error(args.threads))
    if not 0 <= args.seed <= MAX_SEED:
        fail(f"--seed must be between 0 and {MAX_SEED} (2**62), got {args.seed}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        fail(f"--out {args.out} is an existing file, not a folder: pass a folder path")
    compare = None
    if args.compare is not None:
        compare = read_comparison(args.compare, args, fail)
    try:
        check_concept_words(compare["model"] if compare else args.model, args.concepts)
    except KeyError as err:
        fail(err.args[0])
    return compare


def read_comparison(folder: Path, args, fail) -> dict:
    """The configuration of a finished comparison run, after checking that it ranked every method and concept."""
    import pandas as pd

    status, results = folder / "status.json", folder / "results.parquet"
    if not status.is_file() or not results.is_file():
        fail(f"--compare {folder} is not a finished comparison run folder (no status.json or results.parquet)")
    try:
        body = json.loads(status.read_text())
    except ValueError:
        fail(f"--compare {folder}: status.json is unreadable")
    if body.get("job") != "compare" or body.get("status") != "complete":
        fail(f"--compare {folder} holds a {body.get('job')!r} run with status {body.get('status')!r}: pass a "
             f"complete comparison run")
    have = pd.read_parquet(results, columns=["method", "concept"]).drop_duplicates()
    missing = [(m, c) for m in args.methods for c in args.concepts
               if not ((have["method"] == m) & (have["concept"] == c)).any()]
    if missing:
        fail(f"--compare {folder} has no results for {missing[:4]}: it ranked methods "
             f"{sorted(have['method'].unique())} on concepts {sorted(have['concept'].unique())}")
    from interp.compare_config import CompareConfig

    try:
        CompareConfig.from_dict(body["config"], f"--compare {folder}")
    except (TypeError, ValueError) as err:
        fail(str(err))
    return body["config"]


def ranking_config(args, compare: dict | None):
    """The comparison configuration the rankings come from (its components, objective and method options)."""
    from interp.compare_config import CompareConfig

    from analyses._cli import method_options_from_args
    from interp.methods import reference

    if compare is not None:
        return CompareConfig.from_dict(compare, f"--compare {args.compare}")
    # the reference is listed because a comparison needs it; only args.methods are computed
    methods = tuple(dict.fromkeys((reference(), *args.methods)))
    return CompareConfig(model=args.model, concepts=tuple(args.concepts), methods=methods,
                         options=method_options_from_args(args), granularity=args.granularity,
                         families=tuple(args.families), kinds=tuple(args.kinds), blocks=tuple(args.blocks),
                         n_images=args.attr_images, timesteps=tuple(args.timesteps), gen_steps=args.gen_steps,
                         guidance=args.guidance, max_batch=args.max_batch, dtype=args.precision,
                         device=args.device, seed=args.seed)


def contrast_concepts(model, concept: str, args, alternatives) -> list[str]:
    """The concepts a contrastive ranking subtracts: --contrast, else every other value of every attribute on the
    concept world (the same attribute and the others: what an erasure must leave alone), else the alternatives."""
    if args.contrast is not None:
        return [c for c in args.contrast if c != concept]
    if model.is_concept_world:
        from interp.world.vocab import ATTRIBUTES

        return [v for values in ATTRIBUTES.values() for v in values if v != concept]
    return [c for c in (alternatives or []) if c != concept]


def run_config(args) -> dict:
    from analyses._cli import METHOD_DEST

    # how to run is not part of the result (out, threads, progress), nor a method option not given
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k not in ("out", "threads", "no_progress") and not (k.startswith(METHOD_DEST) and v is None)}


def run(args, out: Path, compare: dict | None, log) -> dict:
    from interp.runs import Run

    with Run(out, run_config(args), "erasure") as r:
        result = _run(args, r, compare, log)
        r.complete()
    return result


def _run(args, r, compare, log) -> dict:
    from dataclasses import replace

    import numpy as np

    import interp
    from interp import editing as ed
    from interp import erasure as er
    from interp.compare import concept_spec, select_components
    from interp.concepts import weighed_against
    from interp.diffusion import latent_shape
    from interp.objectives import Objective
    from interp.report import render_report, settings_rows
    from interp.results import read_results
    from interp.runs import check_finite_weights, check_memory
    from interp.store import Store

    t_start = time.perf_counter()
    ccfg = ranking_config(args, compare)
    t0 = time.perf_counter()
    model = interp.load_model(ccfg.model, device=args.device, dtype=args.precision)
    check_finite_weights(model, ccfg.model)
    log(f"model {ccfg.model} loaded in {time.perf_counter() - t0:.1f} s")
    judge = ed.resolve_judge(model, args.judge)
    comps = select_components(model, ccfg)
    if len(comps) == 0:
        raise ValueError(f"no {ccfg.granularity} components match families {list(ccfg.families)}, kinds "
                         f"{list(ccfg.kinds)}, blocks {list(ccfg.blocks)}: widen --families/--kinds/--blocks")
    ecfg = er.ErasureConfig(ks=tuple(args.k or ()), n_random=args.random_rankings, n_masks=args.random_masks,
                            mask_rates=tuple(args.mask_rates), n_boot=args.n_boot, seed=args.seed)
    ks = er.k_grid(len(comps), ecfg.ks)  # k beyond the component set: refused before any work
    alternatives = {c: weighed_against(model, c, args.alternatives or (), args.concepts) for c in args.concepts}
    per_image = int(np.prod(latent_shape(model, 1))) * 4 * 8
    check_memory(args.images * per_image * 3, f"--images {args.images}", "pass fewer --images")
    ocfg = ccfg.objective_config()
    specs = {c: concept_spec(model, c, ccfg) for c in args.concepts}  # a compare run's --alternatives, if any
    objectives = {c: Objective(model, specs[c], ocfg) for c in args.concepts}  # evaluation sets checked before work
    cfg = ed.EvalConfig.from_total(args.images, steps=args.steps, seed=ed.EVAL_SEED + args.seed,
                                   guidance=args.guidance, batch=ed.images_per_call(args.max_batch))
    store = Store(r.cache if args.store is None else args.store)
    results = read_results(args.compare / "results.parquet") if compare is not None else None
    from interp.plan import preflight_run

    # the rankings' methods (when computed here), the erasure's own ablations and generations: largest passes first
    preflight_run(model, comps, ocfg, args.methods if results is None else (), 2 * len(comps), log)
    log(f"{len(comps)} components, k = {list(ks)}, methods {args.methods}, concepts {args.concepts}")
    all_rankings, means, seconds = {}, {}, {}
    layer_of = {c.address: c.layer for c in comps}
    contrastive = any(r.startswith("contrastive") for r in args.rankings)

    def attribution(m, c):  # one method's result frame on one concept (cached in the store)
        obj = objectives.get(c) or Objective(model, concept_spec(model, c, ccfg), ocfg)
        return interp.attribute(m, model, c, comps, objective=obj, store=store, **ccfg.method_options(m, len(comps)))

    for concept in args.concepts:
        rankings = {}
        refs = contrast_concepts(model, concept, args, alternatives[concept]) if contrastive else []
        for m in args.methods:
            t0 = time.perf_counter()
            if results is not None:
                df = results[(results["method"] == m) & (results["concept"] == concept)]
            else:
                df = attribution(m, concept)
            plain = ed.Ranking.from_frame(df, name=m)  # the method's main estimate, not its variants
            contrast = er.contrastive_ranking(df, [attribution(m, c) for c in refs], name=m) if refs else None
            for kind in args.rankings:
                base_ranking = contrast if kind.startswith("contrastive") else plain
                name = m + RANKINGS[kind]
                rankings[name] = (er.per_layer_ranking(base_ranking, layer_of, name=name) if kind.endswith("per-layer")
                                  else replace(base_ranking, name=name))
            seconds[f"ranking {m}/{concept}"] = time.perf_counter() - t0
            log(f"{concept}: {m} rankings {list(args.rankings)} in {seconds[f'ranking {m}/{concept}']:.1f} s"
                + (f" (contrast: {len(refs)} concepts)" if refs else ""))
        all_rankings[concept] = rankings
        if args.ablation == "mean":
            means[concept] = er.ablation_means(objectives[concept], comps)
        objectives[concept].release()  # its replay cache: one concept's is held at a time
    t0 = time.perf_counter()
    study = er.erasure_study(model, comps, all_rankings, ocfg, cfg, ecfg, judge, alternatives, store, log,
                             means=means if args.ablation == "mean" else None, concepts=specs)
    seconds["measure"] = time.perf_counter() - t0
    log(f"erasure measured in {seconds['measure']:.1f} s")
    tables, uri = study["tables"], study["figure"]
    for name, df in tables.items():
        r.write_csv(f"tables/{name}.csv", df)
    r.write_bytes("figures/erasure-curves.png", study["figure_png"])
    meta = r.metadata(n_components=len(comps), ks=list(ks), ranking_config=ccfg.to_dict(),
                      eval_config=cfg.to_dict(), erasure_config=ecfg.to_dict(), seconds=seconds,
                      model_unchanged=True, judge=getattr(judge, "name", None))
    r.write_json("meta.json", meta)
    sections = study["sections"]
    summary = study["findings"] + [(f"Measured in {time.perf_counter() - t_start:.0f} s of wall time; the model's "
                                      "weights were bitwise unchanged afterwards.")]
    r.write_parquet("results.parquet", tables["curves"])
    render_report(r.out, title="Erasure curves: does ablating a method's top components erase the concept?",
                  summary=summary, headline=[("Erasure curves per method and concept (random baseline dashed)", uri)],
                  sections=sections, config=meta, settings=settings_rows(meta, skip=("seconds",)))
    return {"tables": tables, "meta": meta}


def main(argv=None) -> int:
    from analyses._cli import load_plugins

    load_plugins(sys.argv[1:] if argv is None else argv, "erasure_curves")
    parser = build_parser()
    args = parser.parse_args(argv)
    compare = check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from analyses._cli import apply_threads, quiet_if_asked, run_or_exit
    from interp.store import config_hash

    apply_threads(parser, args.threads)
    out = args.out or Path("reports") / f"erasure-{config_hash(run_config(args))[:10]}"
    t0 = time.perf_counter()
    with quiet_if_asked(args):
        result = run_or_exit(parser, out, lambda: run(args, out, compare, logging.info))
    pred = result["tables"]["prediction"]
    logging.info("\narea under the concept-rate curve (lower erases earlier):\n%s",
                 result["tables"]["auc"].pivot_table(index=["concept", "method"], columns="metric", values="auc")
                 .round(3).to_string())
    logging.info("\nSpearman of each method's predicted joint effect with the measured drop:\n%s",
                 pred.pivot_table(index=["concept", "method"], columns="target", values="spearman").round(3)
                 .to_string())
    logging.info("wall time %.1f s; report: %s", time.perf_counter() - t0, (out / "index.html").resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
