"""The main job: every method on the same components, objective and samples, checked against true ablation.

:func:`run_comparison` runs methods x concepts on one component set (small enough that true ablation is exhaustive
over it), measures held-out joint ablations at several ablation rates for the linear datamodeling score, and writes
one run folder: ``results.parquet`` (tidy), ``meta.json`` (config, versions, machine, wall time per method),
``tables/*.csv``, ``figures/*.png`` and a self-contained ``index.html``. Every computation is cached under a hash of
its configuration in ``<run>/cache``, so a re-run reuses it and an interrupted run resumes; the results and the
report are written last, and removed at the start of a run, so a folder never holds a report that looks complete
but is not.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import evaluation, plots
from .methods import REGISTRY, attribute
from .methods.base import versions
from .methods.coar import masked_values, random_masks
from .objectives import Objective, ObjectiveConfig
from .report import render_report
from .results import concat, main_rows
from .store import Store, config_hash

#: Methods of the default run and the options they get (n = number of components).
DEFAULT_METHODS = ("ablation", "cad", "coar", "maskgrad", "ig", "midpoint", "screen", "tracing")


@dataclass(frozen=True)
class CompareConfig:
    """Everything a comparison run depends on; its hash names the cache entries."""

    model: str = "concept-world"
    concepts: tuple[str, ...] = ("red", "blue", "circle", "square", "striped")
    methods: tuple[str, ...] = DEFAULT_METHODS
    granularity: str = "neuron"
    families: tuple[str, ...] = ("ff",)
    kinds: tuple[str, ...] = ("ff.net.2",)
    blocks: tuple[str, ...] = ()
    objective: str = "erase"
    anchor: str = "shared"
    n_images: int = 4
    timesteps: tuple[int, ...] = (250, 600)
    dtype: str = "float32"
    coar_masks: int = 0  # 0: twice the number of components
    coar_alpha: float = 0.05
    maskgrad_masks: int = 12  # measured choice: see MaskGradConfig's docstring
    maskgrad_alpha: float = 0.05
    maskgrad_curve: tuple[int, ...] = (4, 8)  # also report the estimate from its first K masks (free)
    screen_fraction: float = 0.1  # screen-then-verify: true-ablate this top fraction of the maskgrad ranking
    tracing_noise: int = 2
    lds_alphas: tuple[float, ...] = (0.01, 0.05, 0.2)
    heldout_masks: int = 64
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; registered methods are {sorted(REGISTRY)}")
        if "ablation" not in self.methods:
            raise ValueError("the comparison needs 'ablation' (true ablation is the reference of every table)")
        if not self.concepts:
            raise ValueError("no concepts given")
        if len(set(self.concepts)) != len(self.concepts):
            raise ValueError(f"duplicate concepts in {self.concepts}")
        if not 0 < self.screen_fraction <= 1:
            raise ValueError(f"screen fraction must be in (0, 1], got {self.screen_fraction}")
        for a in self.lds_alphas:
            if not 0 < a < 1:
                raise ValueError(f"LDS ablation rates must be in (0, 1), got {a}")

    def to_dict(self) -> dict:
        return asdict(self)

    def objective_config(self) -> ObjectiveConfig:
        return ObjectiveConfig(kind=self.objective, anchor=self.anchor, n_images=self.n_images,
                               timesteps=self.timesteps, seed=self.seed, dtype=self.dtype)

    def method_options(self, method: str, n: int) -> dict:
        coar_m = self.coar_masks or 2 * n
        return {
            "coar": {"n_masks": coar_m, "alpha": self.coar_alpha, "seed": self.seed,
                     "curve": tuple(sorted({max(10, int(coar_m * 0.8 * f)) for f in (0.125, 0.25, 0.5)}))},
            "maskgrad": {"n_masks": self.maskgrad_masks, "alpha": self.maskgrad_alpha, "seed": self.seed,
                         "extra_alphas": tuple(a for a in self.lds_alphas if a != self.maskgrad_alpha),
                         "curve": tuple(k for k in self.maskgrad_curve if k < self.maskgrad_masks)},
            "midpoint": {"alpha": self.maskgrad_alpha, "seed": self.seed},
            # screened by the same mask-averaged gradient the run reports, so the two rows differ only by the
            # verified components
            "screen": {"fraction": self.screen_fraction, "seed": self.seed, "screen": "maskgrad",
                       "screen_options": (("n_masks", self.maskgrad_masks), ("alpha", self.maskgrad_alpha))},
            "tracing": {"n_noise": self.tracing_noise, "seed": self.seed},
        }.get(method, {"seed": self.seed})


def select_components(model, cfg: CompareConfig):
    filters = {"family": list(cfg.families) or None, "kind": list(cfg.kinds) or None,
               "block": list(cfg.blocks) or None}
    return model.components(cfg.granularity, **{k: v for k, v in filters.items() if v})


def heldout_ablations(obj, comps, alpha: float, n_masks: int, seed: int, store: Store, progress=False) -> dict:
    """J under fresh random joint ablations at rate ``alpha`` (never seen by any method): the LDS test set."""
    masks = random_masks(n_masks, len(comps), alpha, seed + 99_991 + int(round(alpha * 10_000)))
    key = {"heldout": alpha, "n": n_masks, "seed": seed, "objective": obj.config.to_dict(),
           "concept": obj.concept.name, "components": comps.addresses[:3] + [len(comps)]}
    entry = store.entry(f"heldout-{obj.concept.name}", key)
    J = masked_values(obj, comps, masks, entry=entry, chunk=32, progress=progress, tag=f"heldout a={alpha}")
    return {"masks": masks.numpy().astype(float), "components": comps.addresses, "j": J.double().mean(1).numpy(),
            "j_intact": float(obj.intact.double().mean())}


def run_comparison(cfg: CompareConfig, out_dir: str | Path, progress: bool = True, log=None) -> dict:
    """Run the comparison and write the run folder; returns the frames and tables."""
    from .models import load_model

    say = log or (lambda msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("index.html", "results.parquet", "meta.json"):
        (out / stale).unlink(missing_ok=True)
    (out / "status.json").write_text(json.dumps({"status": "running", "config": cfg.to_dict()}, indent=1))
    t_start = time.perf_counter()
    store = Store(out / "cache")
    model = load_model(cfg.model)
    comps = select_components(model, cfg)
    say(f"{len(comps)} components ({cfg.granularity}, kinds {list(cfg.kinds)}), {len(cfg.concepts)} concepts, "
        f"methods {list(cfg.methods)}")
    frames, heldout, seconds = [], {}, {}
    ocfg = cfg.objective_config()
    for concept in cfg.concepts:
        obj = Objective(model, concept, ocfg)
        for method in cfg.methods:
            t0 = time.perf_counter()
            df = attribute(method, model, concept, comps, objective=obj, store=store, progress=progress,
                           **cfg.method_options(method, len(comps)))
            seconds[f"{method}/{concept}"] = time.perf_counter() - t0
            frames.append(df)
            say(f"{concept}: {method} done in {seconds[f'{method}/{concept}']:.1f} s")
        for alpha in cfg.lds_alphas:
            heldout[(concept, alpha)] = heldout_ablations(obj, comps, alpha, cfg.heldout_masks, cfg.seed, store, progress)
    results = concat(frames)
    tables, figures = derived_outputs(results, heldout, cfg, store)
    meta = {
        "config": cfg.to_dict(), "config_hash": config_hash(cfg.to_dict()), "versions": versions(),
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "threads": torch.get_num_threads()},
        "n_components": len(comps), "wall_seconds_this_run": time.perf_counter() - t_start,
        "seconds_this_run": seconds, "methods": results.attrs["meta"],
    }
    write_outputs(out, results, tables, figures, meta, cfg)
    return {"results": results, "tables": tables, "meta": meta}


#: Bump when tables or figures change shape, so cached derived outputs of older code are not reused.
DERIVED_VERSION = 3


def derived_outputs(results: pd.DataFrame, heldout: dict, cfg: CompareConfig, store: Store):
    """Tables (with their bootstrap intervals) and figures (PNG bytes) of a run, cached under a hash of the run's
    configuration and of the exact results they are made from: a re-run of a finished run loads them instead of
    recomputing bootstraps and re-drawing figures (which is most of a cached run's time otherwise)."""
    h = hashlib.sha256(pd.util.hash_pandas_object(results, index=False).values.tobytes())
    h.update(json.dumps(results.attrs.get("meta", {}), sort_keys=True, default=str).encode())
    for k in sorted(heldout, key=str):
        h.update(repr(k).encode())
        for part in ("masks", "j"):
            h.update(np.ascontiguousarray(heldout[k][part]).tobytes())
    key = {"config": cfg.to_dict(), "content": h.hexdigest(), "version": DERIVED_VERSION}
    folder = None if store.root is None else store.root / f"derived-{config_hash(key)}"
    if folder is not None and (folder / "done.json").exists():
        done = json.loads((folder / "done.json").read_text())
        if done.get("key") == json.loads(json.dumps(key, default=str)):
            tables = {n: pd.read_parquet(folder / "tables" / f"{n}.parquet") for n in done["tables"]}
            figures = {n: (folder / "figures" / f"{n}.png").read_bytes() for n in done["figures"]}
            return tables, figures
    tables = build_tables(results, heldout, cfg)
    figures = {name: plots.fig_to_png(fig) for name, fig in build_figures(results, tables, cfg).items()}
    if folder is not None:
        for sub in ("tables", "figures"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        for name, df in tables.items():
            df.to_parquet(folder / "tables" / f"{name}.parquet")
        for name, png in figures.items():
            (folder / "figures" / f"{name}.png").write_bytes(png)
        done = {"key": key, "tables": list(tables), "figures": list(figures)}
        tmp = folder / "done.json.tmp"
        tmp.write_text(json.dumps(done, default=str))
        tmp.replace(folder / "done.json")  # written last: a folder without it is recomputed
    return tables, figures


def build_tables(results: pd.DataFrame, heldout: dict, cfg: CompareConfig) -> dict[str, pd.DataFrame]:
    t = {}
    t["correlations"] = evaluation.correlations(results, n_boot=cfg.n_boot, seed=cfg.seed)
    t["correlations_by_layer"] = evaluation.correlations_by_layer(results, n_boot=200, seed=cfg.seed)
    t["topk"] = evaluation.topk_agreement(results)
    t["lds"] = evaluation.lds_table(results, heldout, missing="raise")
    if "coar" in cfg.methods:  # "never worse than COAR?" needs the noise of 64 held-out masks next to the difference
        t["lds_vs_coar"] = evaluation.lds_versus(results, heldout, "coar", n_boot=cfg.n_boot, seed=cfg.seed)
    cost = evaluation.cost_table(results)
    curve_rows = []
    for key, meta in results.attrs["meta"].items():
        for name, point in (meta.get("curve") or {}).items():
            curve_rows.append({"concept": key.split("/", 1)[1], "method": name, "forward_evals": point["forward_evals"],
                               "backward_evals": point.get("backward_evals", 0.0), "seconds": np.nan})
    if curve_rows:
        cost = pd.concat([cost, pd.DataFrame(curve_rows)], ignore_index=True)
    cost["forward_equivalents"] = cost["forward_evals"] + 2 * cost["backward_evals"]
    t["cost"] = cost
    acc = t["lds"].merge(cost[["concept", "method", "forward_equivalents"]], on=["concept", "method"], how="left")
    acc = acc.rename(columns={"forward_equivalents": "forward_evals"})

    def estimator(method: str) -> str:  # budget variants of one estimator form one curve in the plot
        if method.startswith("coar@"):
            return "coar"
        base = re.sub(r"-K\d+$", "", method)
        return "maskgrad" if base == f"maskgrad@{cfg.maskgrad_alpha:g}" else base

    acc.insert(acc.columns.get_loc("method") + 1, "estimator", acc["method"].map(estimator))
    t["accuracy_vs_cost"] = acc
    return t


def build_figures(results: pd.DataFrame, tables: dict, cfg: CompareConfig) -> dict[str, object]:
    figs = {}
    methods = [m for m in results["method"].unique() if "@" not in m]
    for m in methods:
        figs[f"localization-{m}"] = plots.localization_heatmap(results, m)
    for c in cfg.concepts:
        figs[f"scatter-{c}"] = plots.scatter_vs_reference(results, c)
        if "tracing" in cfg.methods:
            figs[f"trace-unet-{c}"] = plots.trace_map_unet(results, c)
            figs[f"trace-text-{c}"] = plots.trace_map_text(results, c)
    figs["accuracy-vs-cost"] = plots.accuracy_vs_cost(tables["accuracy_vs_cost"])
    return figs


def write_outputs(out: Path, results, tables, figures, meta, cfg: CompareConfig) -> None:
    (out / "tables").mkdir(exist_ok=True)
    (out / "figures").mkdir(exist_ok=True)
    for name, df in tables.items():
        df.to_csv(out / "tables" / f"{name}.csv", index=False)
    uris = {}
    for name, png in figures.items():
        (out / "figures" / f"{name}.png").write_bytes(png)
        uris[name] = plots.png_to_data_uri(png)
    sections = report_sections(tables, uris, cfg)
    summary = evaluation.summary_sentences(tables["correlations"])
    tmp = out / "results.parquet.tmp"
    results.to_parquet(tmp, index=False)
    tmp.replace(out / "results.parquet")
    (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    render_report(out, title="Where does the model keep each concept? Methods vs true ablation",
                  summary=summary, sections=sections, config=meta)
    (out / "status.json").write_text(json.dumps({"status": "complete", "config": cfg.to_dict()}, indent=1))


def report_sections(tables, uris, cfg: CompareConfig) -> list[dict]:
    def figs(prefix):
        return [(k, v) for k, v in uris.items() if k.startswith(prefix)]

    return [
        {"title": "Agreement with true ablation",
         "text": "Correlation of each method's component scores with the measured effect of ablating each component "
                 "alone (true ablation), with bootstrap 95% confidence intervals over components.",
         "tables": [("Correlation with true ablation", tables["correlations"])], "figures": figs("scatter-")},
        {"title": "Top-k agreement", "text": "Precision of each method's top-k components against the true top-k.",
         "tables": [("Top-k precision", tables["topk"])], "figures": []},
        {"title": "Joint ablations: linear datamodeling score",
         "text": "How well each method's summed scores predict J after ablating random sets of components together "
                 "(held-out masks at each ablation rate alpha; Spearman and Pearson). 'ablation' is the sum of "
                 "single-ablation effects; 'coar@m' is COAR fitted on its first m masks.",
         "tables": [("LDS on held-out joint ablations", tables["lds"])]
                   + ([("LDS minus COAR's on the same masks, with a paired bootstrap 95% interval over masks "
                        "(an interval containing 0 is a tie)", tables["lds_vs_coar"])] if "lds_vs_coar" in tables else []),
         "figures": figs("accuracy-vs-cost")},
        {"title": "Where the concept lives",
         "text": "Per method, the share of each concept's attribution mass in every layer, positive (supporting) and "
                 "negative (suppressing) components separately.",
         "tables": [("Correlation per layer", tables["correlations_by_layer"])], "figures": figs("localization-")},
        {"title": "Causal tracing maps",
         "text": "Fraction of the concept restored by the clean state of one layer: UNet layers x timestep, and "
                 "text-encoder layers x token position (0 = the last subject token).",
         "tables": [], "figures": figs("trace-")},
        {"title": "Cost", "text": "Forward and backward passes over the evaluation set (a backward counts as two "
                                  "forwards in 'forward_equivalents') and wall time of each method.",
         "tables": [("Cost per method", tables["cost"])], "figures": []},
    ]
