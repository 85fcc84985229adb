"""Erasure curves: ablate each method's top-k components jointly and judge the generated images on held-out prompts.

    python -m analyses.erasure_curves                                   # red, circle; ablation cad coar maskgrad
    python -m analyses.erasure_curves --compare reports/default --concepts red circle striped --k 1 4 16 64 224
    python -m analyses.erasure_curves --model <sd-folder> --judge <clip-folder> --concepts "van gogh" \\
        --alternatives monet picasso --kinds ff.net.0 --blocks mid_block
    python -m analyses.erasure_curves --granularity feature --sae runs/sae-mid-ff --methods ablation cad

For every method's ranking and concept (interp.studies.erasure): the top k components are zero-ablated together, k on a
log grid up to half the component set (or --k), and on held-out prompts and seeds the command measures the one-step J,
the judge's concept rate of the generated images and the retained rate of every other attribute value; bootstrap
bands over images, the area under the concept-rate and retained curves, a random-ranking baseline (--random-rankings
seeded orders), the artifact rate (the share of held-out images in which the judge cannot read some attribute: its
probability of that attribute's top class is below 0.5, interp.studies.erasure.ARTIFACT_THRESHOLD), and how well each
method's own prediction of a joint ablation (the sum of its scores) ranks the
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

import interp
from analyses._cli import (
    apply_threads,
    config_from_args,
    config_parser,
    load_plugins,
    quiet_if_asked,
    run_or_exit,
    threads_error,
)
from interp.core.concepts import weighed_against
from interp.core.diffusion import latent_shape
from interp.core.objectives import Objective
from interp.core.results import read_results
from interp.core.runs import Run, check_finite_weights, check_memory
from interp.core.store import Store, config_hash
from interp.methods import REGISTRY, get, reference
from interp.report import render_report, settings_rows
from interp.studies import editing as ed
from interp.studies import erasure as er
from interp.studies.compare import concept_spec, select_components
from interp.studies.compare_config import (
    DEVICES,
    GRANULARITIES,
    OBJECTIVES,
    PRECISIONS,
    CompareConfig,
    check_concept_words,
    check_fields,
    check_method_options,
    check_saes,
    opt,
)
from interp.studies.plan import plan_erasure, preflight_run

#: --rankings: the suffix each ranking of a method is named with
RANKINGS = {"plain": "", "contrastive": "+contrastive", "per-layer": "+per-layer",
            "contrastive-per-layer": "+contrastive+per-layer"}


def _erasure_methods() -> list[str]:
    return [n for n, m in REGISTRY.items() if m.default_erasure]


@dataclass(frozen=True)
class ErasureCurvesConfig:
    """Everything an erasure-curves run depends on; its hash names the run folder. The command line is generated
    from it (the options' help is here); validated on construction, before anything loads."""

    model: str = opt("concept-world", "'concept-world' (shipped), a concept-world folder, or a Stable Diffusion "
                                      "folder / hub id (then give --judge and --alternatives)")
    concepts: tuple[str, ...] = opt(("red", "circle"), "concepts to erase")
    methods: tuple[str, ...] = opt((), "attribution methods whose rankings are ablated (empty: the registry's "
                                       "erasure defaults)", cli_default=_erasure_methods)
    compare: str | None = opt(None, "a finished comparison run folder: read the rankings from its results.parquet "
                                    "and take its components and objective (the component and objective options "
                                    "are then not used)")
    store: str | None = opt(None, "cache folder of the attributions (default: <out>/cache; a comparison's cache "
                                  "folder reuses its results when components, objective and options match)")
    granularity: str = opt("neuron", "component granularity (feature: the latents of the --sae dictionaries; "
                                     "tokenkv: each cross-attention head's key and value at the concept's tokens; "
                                     "tokenspan: at them and every later position; families and kinds are then not "
                                     "used)", choices=GRANULARITIES + ("feature", "tokenkv", "tokenspan"))
    sae: tuple[str, ...] = opt((), "folders of sparse autoencoders (written by analyses.train_sae) attached to the "
                                   "model before the components are selected: their latents are the components of "
                                   "--granularity feature (families and kinds are then not used)", nargs="*",
                               metavar="FOLDER")
    families: tuple[str, ...] = opt(("ff",), "component families", nargs="*")
    kinds: tuple[str, ...] = opt(("ff.net.2",), "module kinds", nargs="*")
    blocks: tuple[str, ...] = opt((), "UNet stages to include (empty: all)", nargs="*")
    objective: str = opt("erase", "the objective J the rankings attribute and the curves report: erase, amplify, or "
                                  "classifier (the judge's probability of the concept on generated images: an "
                                  "objective through generation)", choices=OBJECTIVES)
    anchor: str = opt("shared", "erase objective: ablate the anchor branch too (shared) or keep it intact (frozen)",
                      choices=("shared", "frozen"))
    attr_images: int = opt(4, "images of the attribution objective")
    timesteps: tuple[int, ...] = opt((250, 600), "timesteps of the attribution objective: J is averaged over them "
                                                 "(700 800 900: the high-noise band, where layout and colour are "
                                                 "decided; 100 200 300: the low-noise band)")
    gen_steps: int = opt(10, "denoising steps of the attribution objective's generated images (models other than "
                             "the concept world)")
    max_batch: int = opt(256, "UNet rows per pass, >= 1: bounds the rankings' passes and every generation call "
                              "(half as many images, at most 64, decoded together); lower it when a GPU runs out "
                              "of memory")
    guidance: float | None = opt(None, "classifier-free guidance scale of every generation: the objective's images "
                                       "and the held-out images (default: the model's)")
    rankings: tuple[str, ...] = opt(("plain",), "which rankings of every method to ablate: plain (its scores), "
                                                "contrastive (its normalized score on the concept minus the mean "
                                                "over --contrast concepts), per-layer (top-k spread evenly over the "
                                                "layers), contrastive-per-layer (both); named <method>+contrastive, "
                                                "...", choices=tuple(RANKINGS))
    contrast: tuple[str, ...] | None = opt(None, "the concepts a contrastive score subtracts (default: on the "
                                                 "concept world every other value of every attribute, elsewhere "
                                                 "the --alternatives)")
    ablation: str = opt("zero", "zero-ablate, or replace each ablated unit by its mean over the attribution "
                                "objective's anchor prompts (the concept word left out)", choices=("zero", "mean"))
    judge: str | None = opt(None, "image judge: 'classifier' (the concept world's, its default), "
                                  "'concept-world-clip', a CLIPModel folder or a hub id (required on other models)")
    alternatives: tuple[str, ...] | None = opt(None, "models other than the concept world: phrases each concept is "
                                                     "weighed against and whose retention is measured (default: "
                                                     "the other --concepts)")
    k: tuple[int, ...] | None = opt(None, "numbers of jointly ablated components (default: 1, 2, 4, ... up to half "
                                          "the set)")
    random_rankings: int = opt(3, "seeded random orders of the baseline")
    random_masks: int = opt(12, "random joint masks of the end-to-end prediction test")
    mask_rates: tuple[float, ...] = opt((0.01, 0.05, 0.2), "ablation rates of the random joint masks, cycled")
    images: int = opt(96, "held-out images per concept: 1/4 target prompts, 1/12 target alone, the rest other values")
    steps: int = opt(10, "denoising steps of the evaluation")
    n_boot: int = opt(1000, "bootstrap resamples, >= 100")
    seed: int = opt(0, "seed of everything random")
    device: str = opt("auto", "device: auto (CUDA, else MPS, else CPU), cpu, cuda or mps", choices=DEVICES)
    dtype: str = opt("float32", "precision of the forward passes", choices=PRECISIONS, flags=("--precision",),
                     hidden_flags=("--dtype",))
    options: dict = opt({}, "each method's options by method (the --<method>-<option> flags)")

    def __post_init__(self):
        check_fields(self)

        if not self.methods:
            object.__setattr__(self, "methods", tuple(_erasure_methods()))
        if not self.concepts or any(not c.strip() for c in self.concepts) or len(set(self.concepts)) != len(
                self.concepts):
            raise ValueError(f"concepts must be non-empty and distinct, got {list(self.concepts)}")
        unknown = [m for m in self.methods if m not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; registered methods are {sorted(REGISTRY)} (a method of "
                             f"your own: --plugin FILE.py)")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"duplicate methods in {list(self.methods)}")

        blind = [m for m in self.methods if self.granularity == "feature"
                 and "feature" not in get(m).capabilities.granularities]
        if blind:
            raise ValueError(f"method(s) {blind} do not attribute SAE features: leave them out of --methods")
        blind = [m for m in self.methods if self.granularity in ("tokenkv", "tokenspan")
                 and self.granularity not in get(m).capabilities.granularities]
        if blind:
            raise ValueError(f"method(s) {blind} do not attribute token-KV components: leave them out of --methods")
        if self.k is not None and (not self.k or any(k < 1 for k in self.k) or len(set(self.k)) != len(self.k)):
            raise ValueError(f"--k values must be distinct integers >= 1, got {list(self.k)}")
        if self.random_rankings < 0 or self.random_masks < 0:
            raise ValueError(f"--random-rankings and --random-masks must be >= 0, got {self.random_rankings} and "
                             f"{self.random_masks}")
        if self.random_masks and (not self.mask_rates or any(not 0 < a < 1 for a in self.mask_rates)):
            raise ValueError(f"--mask-rates must lie in (0, 1), got {list(self.mask_rates)}")
        if self.images < 3 or self.steps < 1 or self.attr_images < 1 or self.gen_steps < 1 or self.max_batch < 1:
            raise ValueError("--images must be >= 3, --steps, --attr-images, --gen-steps and --max-batch >= 1")
        if len(set(self.rankings)) != len(self.rankings):
            raise ValueError(f"duplicate --rankings in {list(self.rankings)}")
        if self.contrast is not None and any(c in self.concepts for c in self.contrast) and len(self.concepts) == 1:
            raise ValueError(f"--contrast {list(self.contrast)} lists the concept being erased")
        object.__setattr__(self, "options", check_method_options(self.options, self.methods))
        if self.compare is None:  # (a comparison brings its own SAEs)
            check_saes(self)

    def to_dict(self) -> dict:
        """The fields as a dict: what the run folder's hash and ``meta.json`` are made of."""
        return asdict(self)


def build_parser() -> argparse.ArgumentParser:
    """The options are ErasureCurvesConfig's fields, each registered method's options, plus how to run: --out,
    --threads, --no-progress, --plugin."""

    return config_parser("erasure_curves", __doc__, ErasureCurvesConfig,
                         "run folder (default reports/erasure-<config hash>)", methods=True, plan=True)


def check_args(parser: argparse.ArgumentParser, args) -> tuple[ErasureCurvesConfig, dict | None]:
    """The run's config from the options, refused with one line before anything heavy loads when bad; with
    ``--compare``, that comparison's config too."""

    def fail(msg):
        parser.exit(2, f"error: {msg}\n")

    if threads_error(args.threads):
        fail(threads_error(args.threads))
    try:
        cfg = config_from_args(ErasureCurvesConfig, args)
    except (ValueError, TypeError) as err:
        fail(str(err))
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        fail(f"--out {args.out} is an existing file, not a folder: pass a folder path")
    compare = None
    if cfg.compare is not None:
        compare = read_comparison(Path(cfg.compare), cfg, fail)
    try:
        check_concept_words(compare["model"] if compare else cfg.model, cfg.concepts)
    except KeyError as err:
        fail(err.args[0])
    return cfg, compare


def read_comparison(folder: Path, args, fail) -> dict:
    """The configuration of a finished comparison run, after checking that it ranked every method and concept."""

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

    try:
        CompareConfig.from_dict(body["config"], f"--compare {folder}")
    except (TypeError, ValueError) as err:
        fail(str(err))
    return body["config"]


def ranking_config(args, compare: dict | None):
    """The comparison configuration the rankings come from (its components, objective and method options)."""

    if compare is not None:
        return CompareConfig.from_dict(compare, f"--compare {args.compare}")
    # the reference is listed because a comparison needs it; only args.methods are computed
    methods = tuple(dict.fromkeys((reference(), *args.methods)))
    return CompareConfig(model=args.model, concepts=tuple(args.concepts), methods=methods, objective=args.objective,
                         anchor=args.anchor, judge=(args.judge or "classifier") if args.objective == "classifier" else "classifier",
                         options=args.options, granularity=args.granularity, sae=tuple(args.sae),
                         families=tuple(args.families), kinds=tuple(args.kinds), blocks=tuple(args.blocks),
                         n_images=args.attr_images, timesteps=tuple(args.timesteps), gen_steps=args.gen_steps,
                         guidance=args.guidance, max_batch=args.max_batch, dtype=args.dtype,
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


def plan(args, compare: dict | None, model=None, passes: dict | None = None):
    """The run's cost plan (:func:`interp.studies.plan.plan_erasure`): the rankings' methods, then the ablation sets
    judged per concept (``passes``: an earlier plan's measured passes on the same model, reused)."""
    ccfg = ranking_config(args, compare)
    if model is None:
        model = interp.load_model(ccfg.model, device=args.device, dtype=args.dtype)
    return plan_erasure(ccfg, methods=() if compare is not None else args.methods,
                        rankings=len(args.methods) * len(args.rankings), ks=tuple(args.k or ()),
                        random_rankings=args.random_rankings, random_masks=args.random_masks, images=args.images,
                        steps=args.steps, guidance=args.guidance, model=model, passes=passes)


def run(args, out: Path, compare: dict | None, log) -> dict:
    with Run(out, args.to_dict(), "erasure") as r:
        result = _run(args, r, compare, log)
        r.complete()
    return result


def _run(args, r, compare, log) -> dict:
    t_start = time.perf_counter()
    ccfg = ranking_config(args, compare)
    t0 = time.perf_counter()
    model = interp.load_model(ccfg.model, device=args.device, dtype=args.dtype)
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
    results = read_results(Path(args.compare) / "results.parquet") if compare is not None else None

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
    load_plugins(sys.argv[1:] if argv is None else argv, "erasure_curves")
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg, compare = check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    apply_threads(parser, args.threads)
    if args.plan:
        with quiet_if_asked(args):
            print(run_or_exit(parser, None, lambda: plan(cfg, compare)).format())
        return 0
    out = args.out or Path("reports") / f"erasure-{config_hash(cfg.to_dict())[:10]}"
    t0 = time.perf_counter()
    with quiet_if_asked(args):
        result = run_or_exit(parser, out, lambda: run(cfg, out, compare, logging.info))
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
