"""Judging a concept edit on held-out prompts and seeds with an image judge (:mod:`interp.core.judges`).

An edit computed from one set of prompts must be judged on others: every prompt here comes from scenes of a seed
stream (:data:`EVAL_SEED`) that neither the objectives (seed 0 and up), the edits' own prompts
(:data:`~interp.studies.editing.edits.EDIT_SEED`) nor the fidelity check (10,000) use, and the initial noises come from
their own seeded generator, fixed per image: the images before and after an edit differ by the edit alone. Three prompt
sets (:func:`heldout_set`):

``target``  full captions of scenes with the target value (the target mentioned together with other attributes);
``alone``   captions naming only the target ("a photo of a red shape");
``other``   full captions of scenes *without* the target value: the specificity set.

The judge is the concept classifier by default (concept world) or any :class:`~interp.core.judges.Judge`, e.g. CLIP
zero-shot (``judge="concept-world-clip"``, a CLIP folder or hub id). On the concept world every judge is asked the
same question, each attribute's value among all its values. On another model (Stable Diffusion) there are no scenes:
the concept is a phrase with ``alternatives`` (the concepts an edit should leave alone, which the judge weighs it
against), and the sets are ``target`` (the phrase in held-out templates, :data:`HELDOUT_TEMPLATES`, none of the
templates the edits and objectives use), ``alone`` (the bare phrase) and ``other`` (each alternative in the same
templates). One pseudo-attribute ``"concept"`` takes the values ``(concept, *alternatives)``: the target rate is the
share of target images the judge assigns to the concept (argmax among concept and alternatives), and the retained
rate is the mean over the alternatives of (share of the alternative's images still assigned to it, after / before).
There are no renders to compare with, so the Frechet distance is measured between the judge's features of the
images after the edit and of the unedited model's images of the same prompts and seeds (``fd_before`` is then 0).

Measured (:func:`evaluate_edit`, one summary row, columns :data:`SUMMARY_COLUMNS`):

- ``target_before`` / ``target_after``: the fraction of ``target`` images the judge says show the
  target value (argmax of the judge's ``predict`` for its attribute), before and after the edit;
  ``target_alone_*`` the same on ``alone``.
- specificity: for every other value of every attribute, its rate (the judge predicts the value the prompt
  asks for) on the ``other`` images that ask for it, before and after (:data:`PER_VALUE_COLUMNS`).
  ``retained_rate`` is the mean over these non-target values of after / before (1 = untouched; values with a
  before-rate of 0 are left out), split into the target's own attribute (``retained_same_attribute``, e.g. the
  other colors when erasing red) and the other attributes. A ratio over a value the model rarely draws is noisy
  and can be far above 1 (a damaged image the judge happens to call "hollow" turns a before-rate of 0.1 into
  0.8), so ``retained_drawn`` averages only over values with a before-rate of at least :data:`DRAWN` (0.5).
  ``cooccurring_retained`` is the same ratio for the other attributes *within* the target prompts (is the circle
  still drawn when red is erased from "red circle"?).
- image quality: the Frechet distance between the judge's features (``Judge.features``: the classifier trunk's
  output, or CLIP's image embedding) of the generated ``target`` + ``other`` images and of renders of the same
  scenes (FID's formula on a concept-world feature space; with ~100 images against 128 features it is a biased,
  relative measure: compare ``fd_after`` with ``fd_before``, not with FID numbers elsewhere).
- cost: the edit's wall time (``edit_seconds``, computing it) and the evaluation's (``eval_seconds``).

:func:`sweep_table`, :func:`tradeoff_plot` and :func:`image_grid` turn several evaluations into the trade-off table,
the trade-off figure (target rate vs retained rate, one line per edit over its budgets) and before/after grids.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from interp.core import diffusion
from interp.core.generation import generate
from interp.core.judges import Judge, load_judge
from interp.core.objectives import EVAL_SEED

#: Before-rate from which a value counts as drawn by the model (for ``retained_drawn``).
DRAWN = 0.5
#: Prompt templates of the held-out sets on a model other than the concept world (none is a template of
#: :data:`interp.core.concepts.DEFAULT_TEMPLATES`, which the objectives and edits use).
HELDOUT_TEMPLATES = ("a rendering of {}", "a close up photo of {}", "a drawing of {}", "a detailed picture of {}")
#: The pseudo-attribute of held-out sets on a model other than the concept world.
TEXT_ATTRIBUTE = "concept"

SUMMARY_COLUMNS = [
    "edit", "label", "concept", "attribute", "budget", "n_components", "n_weights",
    "target_before", "target_after", "target_alone_before", "target_alone_after",
    "retained_rate", "retained_drawn", "retained_same_attribute", "retained_other_attributes",
    "cooccurring_retained", "other_before", "other_after", "fd_before", "fd_after", "edit_seconds", "eval_seconds",
    "n_images",
]
PER_VALUE_COLUMNS = ["edit", "label", "concept", "budget", "set", "attribute", "value", "n", "before", "after",
                     "ratio"]


@dataclass(frozen=True)
class EvalConfig:
    """Held-out prompts and sampling of an edit evaluation."""

    n_target: int = 24
    n_alone: int = 8
    n_other: int = 64
    steps: int = 10
    guidance: float | None = None
    seed: int = EVAL_SEED
    batch: int = 64

    def __post_init__(self):
        for name in ("n_target", "n_alone", "n_other", "steps", "seed", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"EvalConfig.{name} must be an integer, got {v!r}")
        if min(self.n_target, self.n_other) < 1 or self.n_alone < 0 or self.steps < 1 or self.batch < 1:
            raise ValueError(f"an evaluation needs n_target, n_other, steps, batch >= 1 (got {self})")
        if self.seed < 0:
            raise ValueError(f"EvalConfig.seed must be >= 0, got {self.seed}")
        if self.guidance is not None and not (isinstance(self.guidance, (int, float)) and 0 <= self.guidance < 1e4):
            raise ValueError(f"EvalConfig.guidance must be None (the model's default) or a scale >= 0, got "
                             f"{self.guidance!r}")

    @classmethod
    def from_total(cls, n_images: int, **kw) -> "EvalConfig":
        """Split ``n_images`` as 1/4 target, 1/12 target alone, the rest other values (at least 1, 0, 1)."""
        if n_images < 3:
            raise ValueError(f"an evaluation needs at least 3 images, got {n_images}")
        n_t, n_a = max(1, n_images // 4), n_images // 12
        return cls(n_target=n_t, n_alone=n_a, n_other=max(1, n_images - n_t - n_a), **kw)

    @property
    def n_images(self) -> int:
        """Held-out images per evaluation: target, target alone and other values together."""
        return self.n_target + self.n_alone + self.n_other

    def to_dict(self) -> dict:
        """The fields as a dict (part of the cache keys and ``meta.json``)."""
        return asdict(self)


@dataclass(frozen=True, eq=False)
class HeldoutSet:
    """The held-out prompts of one target concept: a frame (one row per image) plus scenes and initial noises."""

    concept: str
    attribute: str
    prompts: pd.DataFrame  # set, prompt, and per attribute the value the prompt asks for (None if not named)
    scenes: tuple  # the concept world's scenes behind the prompts (empty on other models)
    latents: torch.Tensor
    values: dict  # attribute -> the values the judge chooses among


def heldout_set(model, concept: str, config: EvalConfig = EvalConfig(),
                alternatives: Sequence[str] | None = None) -> HeldoutSet:
    """Build the three prompt sets for ``concept`` from the held-out seed stream (see the module docstring).

    ``alternatives``: on a model other than the concept world, the phrases the concept is weighed against and whose
    retention is measured (required there); on the concept world they are the other values of the attribute.
    """
    if not model.is_concept_world:
        return _text_heldout_set(model, concept, config, alternatives)
    # the world provides its own sets (scenes with the value, the value alone, scenes without it)
    attribute, rows, scenes = model.world.heldout_prompts(concept, config.n_target, config.n_alone, config.n_other,
                                                          config.seed)
    prompts = pd.DataFrame(rows)
    model.check_prompts(list(prompts["prompt"]))
    gen = torch.Generator().manual_seed(config.seed)
    latents = diffusion.initial_noise(model, len(prompts), gen, model.dtype, model.device)
    return HeldoutSet(concept, attribute, prompts, scenes, latents, model.world.attributes)


def _text_heldout_set(model, concept: str, config: EvalConfig, alternatives) -> HeldoutSet:
    if not isinstance(concept, str) or not concept.strip():
        raise ValueError(f"the concept must be a non-empty phrase, got {concept!r}")
    alternatives = tuple(alternatives or ())
    if not alternatives:
        raise ValueError(
            f"evaluating an edit of {concept!r} on {model.name!r} (not the concept world) needs alternatives: the "
            f"concepts it is weighed against and whose retention is measured (alternatives=[...]; --alternatives)"
        )
    if concept in alternatives or len(set(alternatives)) != len(alternatives):
        raise ValueError(f"alternatives {list(alternatives)} must be distinct and must not contain {concept!r}")
    T = HELDOUT_TEMPLATES
    rows = [{"set": "target", "prompt": T[i % len(T)].format(concept), TEXT_ATTRIBUTE: concept}
            for i in range(config.n_target)]
    rows += [{"set": "alone", "prompt": concept, TEXT_ATTRIBUTE: concept} for _ in range(config.n_alone)]
    rows += [{"set": "other", "prompt": T[(i // len(alternatives)) % len(T)].format(alt), TEXT_ATTRIBUTE: alt}
             for i in range(config.n_other) for alt in [alternatives[i % len(alternatives)]]]
    prompts = pd.DataFrame(rows)
    model.check_prompts(list(prompts["prompt"]))
    gen = torch.Generator().manual_seed(config.seed)
    latents = diffusion.initial_noise(model, len(prompts), gen, model.dtype, model.device)
    return HeldoutSet(concept, TEXT_ATTRIBUTE, prompts, (), latents, {TEXT_ATTRIBUTE: (concept, *alternatives)})


@dataclass(frozen=True, eq=False)
class Judged:
    """Images generated for a held-out set (under an edit or not) and the judge's verdicts."""

    table: pd.DataFrame  # the prompt frame + pred_<attribute>, p_<attribute> (probability of the asked value) and
    #                      top_<attribute> (the judge's probability of its own verdict: the top class's)
    images: torch.Tensor
    features: np.ndarray  # the judge's image features, one row per image
    seconds: float


def resolve_judge(model, judge: Judge | str | None = None) -> Judge:
    """The judge of an evaluation: ``judge`` (a Judge or a spec for :func:`~interp.core.judges.load_judge`), by default
    the model's concept classifier (a clear error naming the fix when it has none)."""
    return load_judge("classifier" if judge is None else judge, model=model)


def images_per_call(max_rows: int) -> int:
    """Images per generation call of an evaluation that keeps every UNet pass within ``max_rows`` rows (two per
    image under guidance), at most :class:`EvalConfig`'s default; each call's images are decoded together, so this
    bounds the VAE's batch too (at 512x512 pixels, far more memory per image than a UNet row)."""
    return max(1, min(EvalConfig.batch, max_rows // 2))


def judge_images(model, edit, held: HeldoutSet, config: EvalConfig = EvalConfig(),
                 judge: Judge | str | None = None) -> Judged:
    """Generate every held-out image with ``edit`` applied (None: the unedited model) and let the judge name them."""

    judge = resolve_judge(model, judge)
    t0 = time.perf_counter()
    prompts = list(held.prompts["prompt"])
    chunks = []
    ctx = edit.apply(model) if edit is not None else contextlib.nullcontext(None)
    with ctx as edited, torch.no_grad():
        for s in range(0, len(prompts), config.batch):
            lat = held.latents[s : s + config.batch]
            ids = range(s, s + len(lat))  # each image its own step noise, edited or not, in any batch
            if edited is None:
                chunks.append(generate(model, prompts[s : s + config.batch], steps=config.steps,
                                       guidance=config.guidance, latents=lat, max_rows=2 * config.batch,
                                       noise_ids=ids))
            else:
                chunks.append(edited.generate(prompts[s : s + config.batch], steps=config.steps,
                                              guidance=config.guidance, latents=lat, max_rows=2 * config.batch,
                                              noise_ids=ids))
    images = torch.cat(chunks).float().cpu()
    probs = judge.predict(images, held.values)
    table = held.prompts.copy()
    for a, values in held.values.items():
        values = list(values)
        pred = probs[a].argmax(-1).cpu().numpy()
        table[f"pred_{a}"] = [values[i] for i in pred]
        asked = table[a].to_numpy()
        table[f"p_{a}"] = [float(probs[a][j, values.index(v)]) if isinstance(v, str) else np.nan
                           for j, v in enumerate(asked)]
        table[f"top_{a}"] = probs[a].max(-1).values.double().cpu().numpy()
    return Judged(table, images, judge.features(images), time.perf_counter() - t0)


#: The former name of :func:`judge_images`.
judge = judge_images


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID's formula).

    ``|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr sqrtm(S1 S2)``. Only the trace of the matrix square root is needed, and
    ``S1 S2`` is similar to the symmetric PSD matrix ``S1^1/2 S2 S1^1/2``, so the trace is the sum of the square
    roots of that matrix's eigenvalues (symmetric eigensolver, negative rounding clipped to 0): the number
    ``scipy.linalg.sqrtm`` gives (the tests check this), but stable and fast when, as here, there are fewer images
    than features and the product is singular (sqrtm then takes seconds per call and returns complex rounding
    noise; the general eigensolver is slow under a busy multi-threaded BLAS).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, U = np.linalg.eigh(s1)
    root1 = (U * np.sqrt(np.clip(w, 0, None))) @ U.T
    eig = np.linalg.eigvalsh(root1 @ s2 @ root1)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def reference_features(model, held: HeldoutSet, sets: Sequence[str] = ("target", "other"),
                       judge: Judge | str | None = None) -> np.ndarray:
    """The judge's features of ground-truth renders of the held-out scenes (concept world; full-caption sets)."""
    if not held.scenes:
        raise ValueError("only concept-world held-out sets have scenes to render")
    keep = held.prompts["set"].isin(sets).to_numpy()
    # at the size the model generates (32 on the latent concept world)
    renders = model.world.render([s for s, k in zip(held.scenes, keep) if k])
    return resolve_judge(model, judge).features(renders)


def _hit(table: pd.DataFrame, attribute: str, value: str) -> np.ndarray:
    return (table[f"pred_{attribute}"] == value).to_numpy(float)


def _rate(table: pd.DataFrame, mask, attribute: str, value: str) -> float:
    sel = table[np.asarray(mask, bool)]
    return float(_hit(sel, attribute, value).mean()) if len(sel) else float("nan")


def per_value_table(before: Judged, after: Judged, held: HeldoutSet) -> pd.DataFrame:
    """Rate of every attribute value before and after, on the images whose prompt asks for it.

    ``set = "other"``: the specificity set; ``set = "with_target"``: the other attributes inside the target prompts.
    """
    rows = []
    tb, ta = before.table, after.table
    for set_name, source in (("other", "other"), ("with_target", "target")):
        in_set = (tb["set"] == source).to_numpy()
        for a, values in held.values.items():
            if set_name == "with_target" and a == held.attribute:
                continue
            for v in values:
                if a == held.attribute and v == held.concept:
                    continue
                mask = in_set & (tb[a] == v).to_numpy()
                n = int(mask.sum())
                if n == 0:
                    continue
                b, f = _rate(tb, mask, a, v), _rate(ta, mask, a, v)
                rows.append({"set": set_name, "attribute": a, "value": v, "n": n, "before": b, "after": f,
                             "ratio": f / b if b > 0 else np.nan})
    return pd.DataFrame(rows, columns=["set", "attribute", "value", "n", "before", "after", "ratio"])


@dataclass(frozen=True, eq=False)
class EditEvaluation:
    """One edit judged: the summary row, the per-value table and the judged images (for grids)."""

    summary: pd.DataFrame  # one row, SUMMARY_COLUMNS
    per_value: pd.DataFrame  # PER_VALUE_COLUMNS
    before: Judged
    after: Judged
    record: dict = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Baseline:
    """The unedited model on one held-out set, computed once and shared by every edit of the concept."""

    held: HeldoutSet
    judged: Judged
    reference: np.ndarray  # the judge's features of the renders (concept world) or of the unedited images (else)
    config: EvalConfig
    judge: Judge | None = None  # None: the model's concept classifier


def baseline(model, concept: str, config: EvalConfig = EvalConfig(), judge: Judge | str | None = None,
             alternatives: Sequence[str] | None = None) -> Baseline:
    """Held-out set, unedited images and reference features for ``concept`` (see the module docstring)."""
    judge = resolve_judge(model, judge)
    held = heldout_set(model, concept, config, alternatives)
    judged = judge_images(model, None, held, config, judge)
    if held.scenes:
        reference = reference_features(model, held, judge=judge)
    else:  # no renders: the unedited model's images of the same prompts and seeds are the reference
        reference = judged.features[held.prompts["set"].isin(["target", "other"]).to_numpy()]
    return Baseline(held, judged, reference, config, judge)


def evaluate_edit(model, edit, concept: str | None = None, config: EvalConfig = EvalConfig(),
                  base: Baseline | None = None, judge: Judge | str | None = None,
                  alternatives: Sequence[str] | None = None) -> EditEvaluation:
    """Judge ``edit`` (None: no edit) for its target ``concept`` on held-out prompts and seeds.

    ``judge``: the concept classifier by default; ``alternatives``: see :func:`heldout_set` (both come from ``base``
    when it is given).
    """
    concept = concept or getattr(edit, "concept", None)
    if concept is None:
        raise ValueError("name the edit's target concept")
    if base is None:
        base = baseline(model, concept, config, judge, alternatives)
    elif base.held.concept != concept:
        raise ValueError(f"the baseline is for {base.held.concept!r}, the edit targets {concept!r}")
    config = base.config
    held = base.held
    after = judge_images(model, edit, held, config, base.judge) if edit is not None else base.judged
    before = base.judged
    attribute = held.attribute
    tb, ta = before.table, after.table
    is_t, is_a = (tb["set"] == "target").to_numpy(), (tb["set"] == "alone").to_numpy()
    pv = per_value_table(before, after, held)
    other = pv[pv["set"] == "other"]
    same = other[other["attribute"] == attribute]
    diff = other[other["attribute"] != attribute]
    drawn = other[other["before"] >= DRAWN]
    co = pv[pv["set"] == "with_target"]
    full = tb["set"].isin(["target", "other"]).to_numpy()
    rec = edit.record() if edit is not None else {"edit": "none", "seconds": 0.0, "budget": None}
    row = {
        "edit": rec.get("edit"), "label": getattr(edit, "label", "none"), "concept": concept, "attribute": attribute,
        "budget": rec.get("budget"), "n_components": rec.get("n_components"), "n_weights": rec.get("n_weights"),
        "target_before": _rate(tb, is_t, attribute, concept), "target_after": _rate(ta, is_t, attribute, concept),
        "target_alone_before": _rate(tb, is_a, attribute, concept),
        "target_alone_after": _rate(ta, is_a, attribute, concept),
        "retained_rate": float(np.nanmean(other["ratio"])) if other["ratio"].notna().any() else np.nan,
        "retained_drawn": float(np.nanmean(drawn["ratio"])) if drawn["ratio"].notna().any() else np.nan,
        "retained_same_attribute": float(np.nanmean(same["ratio"])) if same["ratio"].notna().any() else np.nan,
        "retained_other_attributes": float(np.nanmean(diff["ratio"])) if diff["ratio"].notna().any() else np.nan,
        "cooccurring_retained": float(np.nanmean(co["ratio"])) if co["ratio"].notna().any() else np.nan,
        "other_before": float(other["before"].mean()) if len(other) else np.nan,
        "other_after": float(other["after"].mean()) if len(other) else np.nan,
        "fd_before": frechet_distance(before.features[full], base.reference),
        "fd_after": frechet_distance(after.features[full], base.reference),
        "edit_seconds": float(rec.get("seconds") or 0.0), "eval_seconds": after.seconds,
        "n_images": len(tb),
    }
    summary = pd.DataFrame([row], columns=SUMMARY_COLUMNS)
    pv = pv.assign(edit=row["edit"], label=row["label"], concept=concept, budget=row["budget"])[PER_VALUE_COLUMNS]
    return EditEvaluation(summary, pv, before, after, rec)


def sweep_table(evaluations: Sequence[EditEvaluation]) -> pd.DataFrame:
    """The trade-off table: one summary row per evaluated edit, in order of edit, concept and budget."""
    if not evaluations:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    df = pd.concat([e.summary for e in evaluations], ignore_index=True)
    return df.sort_values(["concept", "edit", "budget"], kind="stable", na_position="first").reset_index(drop=True)


def tradeoff_plot(table: pd.DataFrame, x: str = "retained_rate") -> Figure:
    """Target rate after the edit (y) against the retained rate of the other values (x), one panel per concept,
    one line per edit through its budgets (labelled), the unedited model at (1, target_before).

    ``x`` is any retained-rate column of :data:`SUMMARY_COLUMNS`, e.g. ``"retained_drawn"`` (only the values the
    unedited model draws reliably).
    """
    if x not in table.columns:
        raise ValueError(f"no column {x!r} in the table; retained-rate columns are "
                         f"{[c for c in SUMMARY_COLUMNS if 'retained' in c]}")
    import seaborn as sns

    concepts = list(dict.fromkeys(table["concept"]))
    fig = Figure(figsize=(5.2 * max(1, len(concepts)) + 1.8, 4.4), layout="constrained")
    if not concepts:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no evaluations", ha="center", va="center")
        ax.set_axis_off()
        return fig
    axes = np.atleast_1d(fig.subplots(1, len(concepts), squeeze=False)).ravel()
    edits = sorted(table["edit"].astype(str).unique())
    palette = dict(zip(edits, sns.color_palette("tab10", len(edits))))
    for i, (ax, c) in enumerate(zip(axes, concepts)):
        sub = table[table["concept"] == c].astype({"edit": str})
        for e, g in sub.groupby("edit", sort=True):
            g = g.sort_values("budget", na_position="first")
            ax.plot(g[x], g["target_after"], marker="o", color=palette[e], label=e)
            for _, r in g.iterrows():
                if pd.notna(r["budget"]):
                    ax.annotate(f"{r['budget']:g}", (r[x], r["target_after"]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points", color=palette[e])
        before = float(sub["target_before"].mean())
        ax.scatter([1.0], [before], marker="*", s=140, color="black", zorder=5, label="unedited")
        ax.set_xlabel(f"{x} of the other values (after / before)")
        ax.set_ylabel(f"rate of '{c}' on its own prompts")
        ax.set_ylim(-0.03, 1.03)
        lo = float(np.nanmin(sub[x].to_numpy(float), initial=1.0))
        hi = float(np.nanmax(sub[x].to_numpy(float), initial=1.0))
        ax.set_xlim(min(0.5, lo) - 0.05, max(1.1, hi + 0.05))
        ax.grid(True, color="0.9")
        ax.set_title(f"erasing '{c}': lower-right is better")
        if i == len(concepts) - 1:
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False, fontsize=8)
    fig.suptitle("edit trade-off: target rate vs specificity (numbers: budget k or ratio)")
    return fig


def image_grid(evaluations: Sequence[EditEvaluation], n: int = 8, sets: Sequence[str] = ("target", "other")) -> Figure:
    """Before/after images for the same prompts and seeds: the first row unedited, then one row per edit.

    Takes the first ``n`` images, half from the target prompts and half from the others (all of one edit's
    evaluations must share the held-out set, i.e. one concept).
    """
    if not evaluations:
        raise ValueError("no evaluations to show")
    table = evaluations[0].before.table
    picks = []
    per = {s: (n + 1) // 2 if s == sets[0] else n // 2 for s in sets}
    for s in sets:
        picks.extend(np.nonzero((table["set"] == s).to_numpy())[0][: per[s]].tolist())
    rows = [("unedited", evaluations[0].before.images)] + [(e.summary["label"].iat[0], e.after.images)
                                                           for e in evaluations]
    fig = Figure(figsize=(1.1 * len(picks) + 2.6, 1.15 * len(rows) + 0.9), layout="constrained")
    axes = fig.subplots(len(rows), len(picks), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for j, idx in enumerate(picks):
            ax = axes[r][j]
            ax.imshow(images[idx].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("\n".join(_wrap(table["prompt"].iat[idx])), fontsize=5)
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"before/after, same prompts and seeds (concept '{evaluations[0].summary['concept'].iat[0]}')")
    return fig


def _wrap(text: str, width: int = 18) -> list[str]:
    lines, cur = [], ""
    for w in text.split():
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return lines + ([cur] if cur else [])
