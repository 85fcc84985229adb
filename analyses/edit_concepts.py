"""Erase concepts with edits built from attributions and judge them on held-out prompts and seeds.

    python -m analyses.edit_concepts                                   # red and circle, the default edits
    python -m analyses.edit_concepts --concepts blue --edits cad-erase ablate:ablation --k 4 16

Edits (``--edits``): cad-erase, cad-amplify (CAD's per-weight rule on the UNet's feed-forward matrices, swept over
``--ratios``); diff-quickfix (the paper's closed form, no budget) and diff-quickfix-preserve (the same plus keys of
32 prompts without the concept that keep their outputs; not in the paper; every text encoder's layer-0 attention
output on pipelines with several); uce (Unified Concept Editing, Gandikota et al. WACV 2024: closed-form edit of
every cross-attention's key and value projections, or on SD3 and FLUX of every joint block's context key and value
projections, 32 preserved prompts); and the ablation edits, swept over
``--k`` on the ``--components`` (default: the GEGLU hidden units of every UNet feed-forward and the value neurons
of every cross-attention): cad-erase-neurons, cad-amplify-neurons (CAD's scores of whole units), coar-edit (Welch t
of per-sample CAD attributions, target vs the other values of its attribute), and ablate:<method> for any
registered attribution method (its top-k positive components). Every edit is judged by an image judge
(--judge: the concept classifier by default; CLIP zero-shot on any model, with --alternatives there):
the target's rate before/after, the other values' rates (retained rate), an image-quality
proxy (Frechet distance of classifier features to renders) and the edit's wall time.

Writes a run folder (default reports/edit-<hash>/): tables/*.csv, edits.json, figures/*.png, meta.json and a
self-contained index.html.
"""

from __future__ import annotations

import argparse
import base64
import logging
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import interp
from analyses._cli import apply_threads, config_parser, parse_config, quiet_if_asked, run_or_exit
from interp.core.concepts import weighed_against
from interp.core.diffusion import latent_shape
from interp.core.objectives import ObjectiveConfig
from interp.core.runs import Run, check_finite_weights, check_memory, versions
from interp.core.store import config_hash
from interp.methods import REGISTRY
from interp.report import render_report, settings_rows
from interp.report.findings import edit_findings
from interp.report.plots import fig_to_base64_png
from interp.studies import editing as ed
from interp.studies.compare_config import (
    DEVICES,
    PRECISIONS,
    attach_saes,
    check_concept_words,
    check_fields,
    check_sae_folders,
    opt,
)
from interp.studies.editing import COMPONENT_PRESETS
from interp.studies.editing.edits import quickfix_module_paths
from interp.studies.editing.uce import cross_attention_projections, uce
from interp.studies.plan import preflight_run

EDIT_CHOICES = ("cad-erase", "cad-amplify", "cad-erase-neurons", "cad-amplify-neurons", "diff-quickfix",
                "diff-quickfix-preserve", "coar-edit", "uce")
DEFAULT_EDITS = ("cad-erase", "diff-quickfix", "diff-quickfix-preserve", "coar-edit", "ablate:maskgrad")
DEFAULT_K = (32, 128, 512)
DEFAULT_COMPONENTS = ("ff", "attn2")
PRESERVE_PROMPTS = 32  # diff-quickfix-preserve: prompts without the concept whose outputs the edit keeps
DEFAULT_RATIOS = (0.05, 0.1, 0.2)


@dataclass(frozen=True)
class EditConfig:
    """Everything an edit run depends on (its hash names the default run folder); the command line is generated
    from it (:func:`analyses._cli.add_config_arguments`), so every field is an option and ``--help`` documents it."""

    model: str = opt("concept-world", "'concept-world' (shipped), a concept-world folder, or a Stable Diffusion folder "
                                      "/ hub id (then give --judge and --alternatives)")
    concepts: tuple[str, ...] = opt(("red", "circle"), "concept words to erase (attribute values: red, circle, "
                                                       "striped, ...)")
    judge: str | None = opt(None, "image judge of the evaluation: 'classifier' (the concept world's, the default "
                                  "there), 'concept-world-clip', a CLIPModel folder or a hub id (required on other "
                                  "models)")
    alternatives: tuple[str, ...] | None = opt(None, "models other than the concept world: phrases each concept is "
                                                     "weighed against, whose retention is measured and which "
                                                     "coar-edit uses as references (None: the other --concepts)",
                                               metavar="PHRASE")
    edits: tuple[str, ...] = opt(DEFAULT_EDITS, f"edits: {', '.join(EDIT_CHOICES)}, or ablate:<method>")
    k: tuple[int, ...] = opt(DEFAULT_K, "numbers of ablated components swept by the ablation edits", metavar="K")
    components: tuple[str, ...] = opt(DEFAULT_COMPONENTS, "component sets the ablation edits rank: ff (the "
                                                          "denoiser's feed-forward hidden units), attn2 "
                                                          "(cross-attention value neurons; SD3/FLUX: the context "
                                                          "stream's, attn.add_v_proj), attn2-heads, text-mlp (every "
                                                          "text encoder's MLP units), features (the latents of the "
                                                          "--sae dictionaries)")
    sae: tuple[str, ...] = opt((), "folders of sparse autoencoders (written by analyses.train_sae) attached to the "
                                   "model: their latents are the component set 'features'", nargs="*",
                               metavar="FOLDER")
    multiplier: float = opt(0.0, "what the ablation edits multiply their top components by: 0 ablates them, a "
                                 "negative value steers against them (a feature's contribution reversed), above 1 "
                                 "amplifies them")
    ratios: tuple[float, ...] = opt(DEFAULT_RATIOS, "CAD per-row ratios swept by cad-erase / cad-amplify",
                                    metavar="RATIO")
    images: int = opt(96, "held-out images per evaluation: 1/4 target prompts, 1/12 target alone, the rest other "
                          "values")
    steps: int = opt(10, "denoising steps of the evaluation")
    attr_images: int = opt(4, "images of the attribution objective")
    attr_steps: int = opt(10, "denoising steps of the attribution objective's generated images (models other than "
                              "the concept world, which renders them)")
    guidance: float | None = opt(None, "classifier-free guidance scale of every generation, held-out and attribution "
                                       "images (default: the model's)")
    seed: int = opt(0, "seed of the attributions and the held-out stream offset")
    max_batch: int = opt(256, "UNet rows per pass, >= 1: bounds the attribution objective's passes and every "
                              "generation call (half as many images, at most 64, decoded together); lower it when a "
                              "GPU runs out of memory")
    device: str = opt("auto", "device: auto (CUDA, else MPS, else CPU), cpu, cuda or mps", choices=DEVICES)
    dtype: str = opt("float32", "precision of the forward passes (statistics are accumulated in float32)",
                     choices=PRECISIONS, flags=("--precision",), hidden_flags=("--dtype",))

    def __post_init__(self):
        check_fields(self)  # types and choices; what needs the registry or the model is checked by check_config

    def to_dict(self) -> dict:
        return asdict(self)


def build_parser() -> argparse.ArgumentParser:
    """The options are EditConfig's fields, plus how to run: --out, --threads, --no-progress. Imports nothing heavy,
    so --help is fast."""

    return config_parser("edit_concepts", __doc__, EditConfig, "run folder (default reports/edit-<config hash>)")


def check_config(config: EditConfig) -> None:
    """Refuse a bad configuration before anything loads (ValueError naming the option): unknown concept words or
    edits, empty or invalid sweeps."""

    if any(not c.strip() for c in config.concepts):
        raise ValueError(f"concept words must be non-empty, got {list(config.concepts)}")
    try:
        check_concept_words(config.model, config.concepts)
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    if len(set(config.concepts)) != len(config.concepts):
        raise ValueError(f"duplicate concepts in {list(config.concepts)}")
    for e in config.edits:
        if e.startswith("ablate:"):
            if e.split(":", 1)[1] not in REGISTRY:
                raise ValueError(f"unknown method in edit {e!r}; registered methods are {sorted(REGISTRY)}")
        elif e not in EDIT_CHOICES:
            raise ValueError(f"unknown edit {e!r}; edits are {', '.join(EDIT_CHOICES)} or ablate:<method> with a "
                             f"method of {sorted(REGISTRY)}")

    bad = [c for c in config.components if c not in COMPONENT_PRESETS]
    if bad:
        raise ValueError(f"unknown component set(s) {bad}; choose from {sorted(COMPONENT_PRESETS)}")
    check_sae_folders(config.sae)
    if "features" in config.components and not config.sae:
        raise ValueError("--components features needs the sparse autoencoders: pass --sae FOLDER (written by "
                         "python -m analyses.train_sae)")
    if config.sae and "features" not in config.components:
        raise ValueError("--sae is used with --components features: add it or drop --sae")
    if not math.isfinite(config.multiplier) or config.multiplier == 1:
        raise ValueError(f"--multiplier must be finite and not 1 (1 leaves the components as they are), got "
                         f"{config.multiplier}")
    if any(k < 0 for k in config.k) or not config.k:
        raise ValueError(f"--k values must be non-negative integers, got {list(config.k)}")
    if any(not 0 <= r <= 1 for r in config.ratios) or not config.ratios:
        raise ValueError(f"--ratios must lie in [0, 1], got {list(config.ratios)}")
    if config.images < 3 or config.steps < 1 or config.attr_images < 1 or config.attr_steps < 1:
        raise ValueError("--images must be >= 3, --steps, --attr-images and --attr-steps >= 1")
    if config.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {config.max_batch}")


def make_edits(model, concept: str, spec: str, config, objective, comps):
    """The edits of one spec for one concept, one per budget of its sweep."""

    if spec == "cad-erase":
        ws = ed.cad_weight_scores(model, concept, "erase", objective)
        return [ws.edit(r) for r in config.ratios]
    if spec == "cad-amplify":
        ws = ed.cad_weight_scores(model, concept, "amplify", replace(objective, kind="amplify"))
        return [ws.edit(r) for r in config.ratios]
    if spec in ("diff-quickfix", "diff-quickfix-preserve"):
        preserve = PRESERVE_PROMPTS if spec.endswith("preserve") else 0
        edit = ed.diff_quickfix(model, concept, preserve=preserve, seed=ed.EDIT_SEED + config.seed)
        return [replace(edit, name=spec)]
    if spec == "uce":  # Unified Concept Editing: cross-attention keys/values, 32 preserved prompts
        return [uce(model, concept, preserve=PRESERVE_PROMPTS, seed=ed.EDIT_SEED + config.seed)]
    if spec == "cad-erase-neurons":
        ranking = ed.rank_components(model, concept, "cad", comps, objective=objective, name=spec)
    elif spec == "cad-amplify-neurons":
        ranking = ed.rank_components(model, concept, "cad", comps, objective=replace(objective, kind="amplify"),
                                     side="negative", name=spec)
    elif spec == "coar-edit":
        refs = weighed_against(model, concept, config.alternatives or (), config.concepts)
        ranking = ed.coar_edit_ranking(model, concept, refs, components=comps,
                                       objective=objective)
    else:
        ranking = ed.rank_components(model, concept, spec.split(":", 1)[1], comps, objective=objective, name=spec,
                                     seed=config.seed)
    return [ranking.top(k, config.multiplier) for k in config.k]


def run(config: EditConfig, out: Path, log) -> dict:
    """The edit job in its run folder (:class:`interp.core.runs.Run`: status, traceback on failure, atomic writes)."""

    with Run(out, config.to_dict(), "edit") as r:
        result = _run(config, r, log)
        r.complete()
    return result


def _run(config, r, log) -> dict:
    t_start = time.perf_counter()
    out = r.out
    model = interp.load_model(config.model, device=config.device, dtype=config.dtype)
    check_finite_weights(model, config.model)
    attach_saes(model, config)  # their latents: the component set 'features'
    judge = ed.resolve_judge(model, config.judge)  # a clear error (naming --judge) when the model has no classifier
    # held-out images of one evaluation (generated, judged, kept with their features) and the attribution samples
    per_image = int(np.prod(latent_shape(model, 1))) * 4 * 8
    check_memory((config.images + config.attr_images) * per_image * 3, f"--images {config.images}",
                 "pass fewer --images")
    fingerprint = model.state_fingerprint()
    objective = ObjectiveConfig(kind="erase", n_images=config.attr_images, seed=config.seed,
                                gen_steps=config.attr_steps, guidance=config.guidance, max_batch=config.max_batch)
    cfg = ed.EvalConfig.from_total(config.images, steps=config.steps, seed=ed.EVAL_SEED + config.seed,
                                   guidance=config.guidance, batch=ed.images_per_call(config.max_batch))
    comps = ed.edit_components(model, config.components)
    # the closed-form edits' projections: where one does not apply to the model's family, refused before any work
    for spec in config.edits:
        if spec == "uce":
            cross_attention_projections(model)
        elif spec.startswith("diff-quickfix"):
            quickfix_module_paths(model)

    # the methods behind the edits (CAD's weight scores take gradients), then the largest passes, before any work
    methods = {m for spec in config.edits for m in (
        ["cad"] if spec.startswith("cad-") else ["coar"] if spec == "coar-edit" else
        [spec.split(":", 1)[1]] if spec.startswith("ablate:") else [])}
    preflight_run(model, comps, objective, sorted(methods), 2 * len(comps), log)

    evaluations, records, grids = [], [], {}
    for concept in config.concepts:
        t0 = time.perf_counter()
        base = ed.baseline(model, concept, cfg, judge,
                           weighed_against(model, concept, config.alternatives or (), config.concepts))
        bt = base.judged.table
        rate = float((bt.loc[bt["set"] == "target", f"pred_{base.held.attribute}"] == concept).mean())
        log(f"{concept}: baseline of {cfg.n_images} held-out images in {time.perf_counter() - t0:.1f} s "
            f"(target rate {rate:.2f})")
        strongest = []
        for spec in config.edits:
            t0 = time.perf_counter()
            edits = make_edits(model, concept, spec, config, objective, comps)
            log(f"{concept}: {spec} computed in {time.perf_counter() - t0:.1f} s")
            evs = []
            for e in edits:
                ev = ed.evaluate_edit(model, e, concept, cfg, base)
                s = ev.summary.iloc[0]
                log(f"  {e.label}: target {s['target_before']:.2f} -> {s['target_after']:.2f}, retained "
                    f"{s['retained_rate']:.2f}, FD {s['fd_before']:.2f} -> {s['fd_after']:.2f}")
                rec = e.record()
                rec.update(label=e.label, target=concept)
                records.append(rec)
                evs.append(ev)
            evaluations.extend(evs)
            strongest.append(evs[-1])
        grids[concept] = ed.image_grid(strongest, n=8)
    changed = [n for n, p in model.parameters() if not torch.equal(p, fingerprint[n])]
    if changed:  # the edits' contract: the user's model is bitwise the same after every edit
        raise RuntimeError(f"weights changed by the edits: {changed[:3]}")
    table = ed.sweep_table(evaluations)
    per_value = pd.concat([e.per_value for e in evaluations], ignore_index=True)
    edits_table = pd.DataFrame([{k: v for k, v in r.items() if k not in ("components", "scores", "weights")}
                                for r in records])
    tables = {"tradeoff": table, "per_value": per_value, "edits": edits_table}
    figures = {"tradeoff": ed.tradeoff_plot(table), "tradeoff-drawn": ed.tradeoff_plot(table, x="retained_drawn"),
               **{f"grid-{c}": g for c, g in grids.items()}}
    for name, df in tables.items():
        r.write_csv(f"tables/{name}.csv", df)
    r.write_json("edits.json", records)
    uris = {}
    for name, fig in figures.items():  # rendered once: the PNG file is the report's embedded image
        uris[name] = fig_to_base64_png(fig)
        r.write_bytes(f"figures/{name}.png", base64.b64decode(uris[name].split(",", 1)[1]))
    wall = time.perf_counter() - t_start
    meta = {"config": config.to_dict(),
            "eval_config": cfg.to_dict(), "objective": objective.to_dict(), "versions": versions(),
            "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
            "wall_seconds": wall, "model_unchanged": not changed}
    r.write_json("meta.json", meta)

    summary = edit_findings(table) + [
        f"{len(evaluations)} edits evaluated on {len(config.concepts)} concept(s) in {wall:.0f} s of wall time "
        f"({torch.get_num_threads()} thread(s)); the model's weights were bitwise unchanged afterwards."]
    render_report(out, title="Concept editing from attributions", summary=summary,
                  headline=[("Target rate after each edit against the other values' retained rate, every budget "
                             "(the unedited model is the star; lower right is better)", uris["tradeoff"])],
                  sections=report_sections(tables, uris, cfg, config), config=meta, settings=settings_rows(meta))
    return {"tables": tables, "meta": meta}


def summary_sentences(table) -> list[str]:
    """One sentence per (concept, edit) at the edit's strongest budget."""
    out = []
    for (concept, edit), g in table.groupby(["concept", "edit"], sort=False):
        r = g.iloc[-1]
        out.append(
            f"Erasing '{concept}' with {r['label']}: its rate on held-out prompts went from {r['target_before']:.2f} "
            f"to {r['target_after']:.2f} (alone: {r['target_alone_before']:.2f} to {r['target_alone_after']:.2f}); "
            f"other values kept {r['retained_rate']:.2f} of their rate ({r['retained_drawn']:.2f} over the values the "
            f"model draws reliably, {r['retained_same_attribute']:.2f} within its attribute); feature Frechet "
            f"distance to renders {r['fd_before']:.2f} to {r['fd_after']:.2f}; "
            f"computed in {r['edit_seconds']:.1f} s."
        )
    return out


def report_sections(tables, uris, cfg, config) -> list[dict]:
    def figs(prefix):
        return [(k, v) for k, v in uris.items() if k.startswith(prefix)]

    cols = ["concept", "label", "n_components", "n_weights", "target_before", "target_after", "target_alone_before",
            "target_alone_after", "retained_rate", "retained_drawn", "retained_same_attribute",
            "retained_other_attributes", "cooccurring_retained", "fd_before", "fd_after", "edit_seconds",
            "eval_seconds"]
    short = ["concept", "label", "target_before", "target_after", "retained_rate", "retained_drawn", "fd_before",
             "fd_after", "edit_seconds"]
    grids = [(f"'{k[len('grid-'):]}': the unedited model (first row), then each edit at its largest budget", v)
             for k, v in figs("grid-")]
    return [
        {"title": "Trade-off: erasing the target vs keeping everything else",
         "text": f"Every edit at every budget, judged on {cfg.n_images} held-out images per concept ({cfg.n_target} "
                 f"full captions with the target, {cfg.n_alone} naming the target alone, {cfg.n_other} asking for "
                 f"other values), {cfg.steps} denoising steps, same prompts and initial noises before and after. "
                 "Target rate = fraction of images the judge says show the target value. Retained rate = "
                 "mean over the other values of (rate after / rate before); retained_drawn the same over the values "
                 "the unedited model draws at least half of the time (ratios of rarely drawn values are noisy and "
                 "can exceed 1 when the classifier reads damaged images as them). "
                 "fd = Frechet distance between classifier "
                 "features of generated images and of renders of the same scenes (lower is better; compare after "
                 "with before).",
         "tables": [("Trade-off: every edit and budget",
                     tables["tradeoff"][[c for c in short if c in tables["tradeoff"]]])],
         "details": [
             {"title": "Each edit at its strongest budget, in words",
              "text": "\n\n".join(summary_sentences(tables["tradeoff"]))},
             {"title": "Trade-off over the values the unedited model draws reliably",
              "figures": figs("tradeoff-drawn")},
             {"title": "Full trade-off table (alone / same-attribute / co-occurring retention, wall times)",
              "tables": [("Trade-off table", tables["tradeoff"][[c for c in cols if c in tables["tradeoff"]]])]},
         ]},
        {"title": "Before and after",
         "text": "The same prompts and seeds: the first row is the unedited model, then each edit at its largest "
                 "budget. Left half: prompts with the target; right half: prompts without it.",
         "figures": grids[:1],
         "details": [{"title": "Before and after: the other concepts", "figures": grids[1:]}] if len(grids) > 1 else []},
        {"title": "Per value", "text": "Rate of every other attribute value before and after each edit; "
                                       "'with_target' rows are the other attributes inside the target prompts.",
         "details": [{"title": f"Per-value rates ({len(tables['per_value'])} rows)",
                      "tables": [("Per-value rates", tables["per_value"])]}]},
        {"title": "What each edit changed",
         "text": "Mechanism, ranking method, number of ablated components or changed weights, and wall time to "
                 "compute the edit. Full component lists are in edits.json.",
         "details": [{"title": f"Edits ({len(tables['edits'])} rows)", "tables": [("Edits", tables["edits"])]}]},
    ]


def main(argv=None) -> int:
    parser = build_parser()
    args, config = parse_config(parser, EditConfig, argv)
    try:
        check_config(config)  # what needs the registry: the edits and concept words
    except (ValueError, TypeError) as err:
        parser.exit(2, f"error: {err}\n")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    apply_threads(parser, args.threads)
    out = args.out or Path("reports") / f"edit-{config_hash(config.to_dict())[:10]}"
    t0 = time.perf_counter()
    with quiet_if_asked(args):
        run_or_exit(parser, out, lambda: run(config, out, logging.info))
    logging.info("wall time %.1f s; report: %s", time.perf_counter() - t0, (out / "index.html").resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
