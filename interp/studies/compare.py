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

from interp.core import models, results
from interp.core.concepts import judged_concept, weighed_against
from interp.core.diffusion import latent_shape
from interp.core.engine import masked_values, random_masks
from interp.core.objectives import Objective
from interp.core.results import concat, empty_maps
from interp.core.runs import Run, check_finite_weights, check_memory
from interp.core.store import Store, frame_to_parquet_bytes
from interp.methods import REGISTRY
from interp.methods.base import components_hash, get
from interp.report import evaluation, findings, plots
from interp.studies import compare_outputs
from interp.studies import erasure as er
from interp.studies.compare_config import (  # noqa: F401  (re-exported)
    CompareConfig,
    check_concept_words,
    select_components,
)
from interp.studies.compare_outputs import _without_attrs, build_figures, build_tables
from interp.studies.compare_report import write_outputs
from interp.studies.editing.edits import Ranking
from interp.studies.editing.evaluate import EVAL_SEED, EvalConfig, images_per_call, resolve_judge
from interp.studies.plan import preflight_run


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


def estimate_memory(cfg: CompareConfig, n: int, sample_numel: int) -> dict[str, float]:
    """Bytes the largest allocations of a run need, by part (an estimate, to refuse hopeless configurations early)."""
    C, A = len(cfg.concepts), len(cfg.lds_alphas)
    samples = cfg.n_images * len(cfg.timesteps)
    parts = {
        # float64 masks kept for every (concept, rate), plus the float32 draw, bool mask and a float64 copy while built
        "held-out masks (--heldout-masks x components)": cfg.heldout_masks * n * (8 * C * A + 21),
        # renders, noise, noised images and targets of the evaluation set, and the prompts
        "evaluation set (--images x timesteps)": samples * sample_numel * 4 * 6 + cfg.n_images * 400,
    }
    for m in cfg.methods:  # what each method holds beyond the engine's (COAR: its masks and design matrix)
        cls = get(m)
        parts.update(cls.memory_bytes(cls.Config(**cfg.method_options(m, n)), n))
    return parts


def run_comparison(cfg: CompareConfig, out_dir: str | Path, progress: bool = True, log=None, executor=None) -> dict:
    """Run the comparison and write the run folder; returns the frames and tables. ``executor``: where the sweeps
    run (:mod:`interp.core.executors`; default this process); it changes no result, so it is not part of the config.

    Everything that can be checked before work is: the config on construction, the concept words before the model
    loads, then the weights (finite), the component selection (non-empty), the memory the configuration needs, every
    method's options and the objective (timesteps in the scheduler's range) before any method runs."""

    say = log or (lambda msg: None)
    check_concept_words(cfg.model, cfg.concepts)
    with Run(out_dir, cfg.to_dict(), "compare") as run:
        store = Store(run.cache)
        t0 = time.perf_counter()
        model = models.load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)  # (replaceable, as a module attribute)
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
        masks = [getattr(m.config, "n_masks", 0) or 0 for m in methods.values()]  # the largest sweep of masks
        preflight_run(model, comps, ocfg, cfg.methods, max(2 * len(comps), cfg.heldout_masks, *masks), say)
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
        write_outputs(run, results, maps, tables, figures, meta, cfg, extra.get("sections", ()),
                      extra.get("findings", ()))
        run.complete()
    return {"results": results, "maps": maps, "tables": tables, "meta": meta}


def derived_code_digest() -> str:
    """A digest of the source of the modules that make the tables and figures (this one,
    :mod:`interp.studies.compare_outputs`, :mod:`interp.report.evaluation`, :mod:`interp.report.plots`,
    :mod:`interp.report.findings` (which estimator the headline figure shows), :mod:`interp.core.results`, whose costs
    the tables read, and every
    registered method's module, whose labels, capabilities and checks (causal tracing's corruption check) the tables
    and figures apply): cached tables and figures are reused only when the code that made them is unchanged, with no
    version number to remember to bump."""

    modules = [sys.modules[__name__], compare_outputs, evaluation, plots, findings, results]
    modules += [sys.modules[m] for m in sorted({cls.__module__ for cls in REGISTRY.values()})]
    h = hashlib.sha256()
    for module in modules:
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


def concept_spec(model, concept: str, cfg: CompareConfig):
    """The concept a run's objective is built on: the word itself (the concept world's own concepts, or a phrase
    with the judge's generic alternatives), or on other models with ``--alternatives`` a text concept weighed
    against them."""

    return judged_concept(model, concept, cfg.alternatives, n=cfg.n_images)


def erasure_setup(model, comps, cfg: CompareConfig) -> dict:
    """What the erasure curves need, checked before any method runs: the k grid against the component set, the
    judge, the values each concept is weighed against and the held-out image set."""

    er.k_grid(len(comps), cfg.erasure_k)
    alternatives = {c: weighed_against(model, c, cfg.alternatives, cfg.concepts) for c in cfg.concepts}
    return {"judge": resolve_judge(model, cfg.judge), "alternatives": alternatives,
            "eval": EvalConfig.from_total(cfg.erasure_images, steps=cfg.erasure_steps, seed=EVAL_SEED + cfg.seed,
                                          guidance=cfg.guidance, batch=images_per_call(cfg.max_batch)),
            "config": er.ErasureConfig(ks=cfg.erasure_k, n_boot=cfg.n_boot, seed=cfg.seed)}


def erasure_curves(model, comps, results: pd.DataFrame, cfg: CompareConfig, setup: dict, store: Store, say) -> dict:
    """Erasure curves (:mod:`interp.studies.erasure`) of every method's main estimate in this run, per concept."""

    rows = _without_attrs(results)
    rankings = {c: {m: Ranking.from_frame(rows[(rows["method"] == m) & (rows["concept"] == c)], name=m)
                    for m in cfg.methods} for c in cfg.concepts}
    return er.erasure_study(model, comps, rankings, cfg.objective_config(), setup["eval"], setup["config"],
                            setup["judge"], setup["alternatives"], store, say,
                            concepts={c: concept_spec(model, c, cfg) for c in cfg.concepts})
