"""Erasure curves: from a one-step attribution to the generated image.

Every attribution method of the suite estimates one number, the change of a one-step objective J when components
are ablated. The question a researcher asks is about pictures: if I ablate the components a method ranks first, does
the concept leave the generated images, and does everything else stay? This module measures that end to end, in the
spirit of the deletion / "remove and retrain"-free perturbation curves of feature attribution (Samek et al., IEEE
TNNLS 2017; Petsiuk et al., RISE, BMVC 2018) and of COAR's component-ablation evaluation (Shah, Ilyas, Madry, ICML
2024), on held-out prompts and seeds.

For one concept and each method's ranking (a :class:`~interp.studies.editing.edits.Ranking`: components ordered by
score, only positive scores are ever ablated, as every erase edit does), the top ``k`` components are zero-ablated
*jointly*
(:class:`~interp.studies.editing.edits.AblationEdit`, the multiplier mechanism; the weights are never touched) for ``k``
on a log grid up to half the component set (:func:`k_grid`), and three things are measured on the held-out set of the
edit evaluation (:func:`interp.studies.editing.evaluate.heldout_set`, seed stream ``EVAL_SEED``, never seen by an
attribution):

``concept_rate``
    the share of the held-out ``target`` images (full captions with the concept) the image judge assigns to the
    concept (:func:`~interp.studies.editing.evaluate.judge_images`; the concept classifier or CLIP zero-shot);
    ``alone_rate`` the same on the captions naming the concept alone.
``retained_rate``
    the mean over every other attribute value of (its rate after / before) on the ``other`` images that ask for it
    (:func:`~interp.studies.editing.evaluate.per_value_table`'s ``other`` rows; 1 = untouched).
``artifact_rate``
    the share of all held-out images (target, alone and other) in which the judge cannot read some attribute: the
    judge's probability of its own verdict (the top class of that attribute's values) is below
    :data:`ARTIFACT_THRESHOLD` (0.5) for at least one attribute. With 2 to 5 values per attribute a top class under
    0.5 means no value holds a majority: the image shows no clear color (or shape, texture, background), the kind
    of damage an ablation can do without "erasing" anything; a concept rate that falls while this rises is
    destruction, not erasure. The unedited model's own rate is the curve's k = 0 point.
``j_ratio``
    the one-step objective J after / before (:func:`interp.core.engine.masked_values`; the points table keeps J itself)
    on an evaluation set drawn from the held-out seed stream (the attribution objective's configuration with
    ``seed + EVAL_SEED``: held-out scenes and noises on the concept world, held-out noises on text concepts, whose
    templates are fixed).

Bands are percentile bootstrap intervals over images (target and other images resampled, the same resamples for
every point, so curves, areas and differences share them) and, for J, over the evaluation samples. The area under
the curve is the trapezoid over ``x = log(1 + k) / log(1 + k_max)`` from the unedited model (k = 0) to the largest
``k``: low for ``concept_rate`` (the concept goes early), high for ``retained_rate`` (the rest stays).

The random baseline ablates the first ``k`` of :attr:`ErasureConfig.n_random` seeded random orders of the
components; its curve is the mean over those orders (its band resamples images, with the orders fixed).

**End-to-end prediction** (:func:`prediction_table`): a method's own prediction of a joint ablation is the sum of
its scores over the ablated set (the linear datamodel every score implies, as in the LDS of the comparison). Across
the method's own top-k sets and :attr:`ErasureConfig.n_masks` random joint masks (Bernoulli at the rates of
:attr:`ErasureConfig.mask_rates`, shared by all methods), Spearman's correlation between the prediction and the
measured drop of the concept rate (before - after), with a bootstrap interval over images and points jointly; the
same for the drop of J.

**Targeted erasure** (issue 17, item 3): rankings that ask for specificity, not only effect, each a
:class:`~interp.studies.editing.edits.Ranking` that :func:`measure` ablates like any other. :func:`contrastive_ranking`
scores a component by its (L1-normalized) score on the target minus the mean of the same method's normalized scores
on other concepts (the other values of the same and of the other attributes; in the spirit of COAR-Edit's
target-vs-reference contrast, Shah et al. ICML 2024, with plain differences of means instead of a t-statistic);
:func:`per_layer_ranking` reorders any ranking so that its top ``k`` spreads evenly over the layers (modules), as
CAD-Erase's per-row budget does for weights (Nguyen et al. 2024); and ``measure(..., means=...)`` mean-ablates
instead of zero-ablating (:func:`ablation_means`: each unit's mean over the objective's anchor prompts, the concept
word left out).

Each ablated set is generated and judged once per concept (sets shared by several methods or budgets, e.g. the top
unit of two methods, are measured once) and cached in the store chunk by chunk (keyed by the model's weights, the
components, the held-out configuration, the judge and the set), so a killed run resumes and a re-run is cheap.
Nothing here is specific to the concept world: the held-out sets, the judge and the per-value table come from
:mod:`interp.studies.editing.evaluate`, which handles concept-world attributes and text concepts with alternatives
alike.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from scipy import stats

from interp.core.engine import masked_values, random_masks
from interp.core.features import identity
from interp.core.interventions import compile_plan
from interp.core.models import model_fingerprint, module_digest
from interp.core.objectives import Objective, ObjectiveConfig, reference_means
from interp.core.store import Store
from interp.methods.base import components_hash
from interp.report import plots
from interp.studies.editing.edits import AblationEdit, Ranking
from interp.studies.editing.evaluate import (
    EVAL_SEED,
    Baseline,
    EvalConfig,
    Judged,
    baseline,
    judge_images,
    per_value_table,
)

#: Metrics of the curves, in the order of the figure's rows.
METRICS = ("concept_rate", "alone_rate", "retained_rate", "artifact_rate", "j_ratio")
#: An image is an artifact when, for some attribute, the judge's probability of its top class is below this.
ARTIFACT_THRESHOLD = 0.5
RANDOM = "random"
CURVE_COLUMNS = ["concept", "method", "k", "n_ablated", "metric", "value", "lo", "hi"]
POINT_COLUMNS = ["concept", "method", "ranking", "kind", "k", "alpha", "n_ablated", "set_id", "concept_rate",
                 "alone_rate", "retained_rate", "artifact_rate", "j", "j_intact"]


@dataclass(frozen=True)
class ErasureConfig:
    """What an erasure-curve measurement sweeps (the held-out set is an :class:`EvalConfig`)."""

    ks: tuple[int, ...] = ()  # numbers of ablated components; empty: the log grid of :func:`k_grid`
    n_random: int = 3  # seeded random rankings of the baseline
    n_masks: int = 12  # random joint masks of the end-to-end prediction test (shared by every method)
    mask_rates: tuple[float, ...] = (0.01, 0.05, 0.2)  # their ablation rates, cycled
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "ks", tuple(self.ks))
        object.__setattr__(self, "mask_rates", tuple(float(a) for a in self.mask_rates))
        for name in ("n_random", "n_masks", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"ErasureConfig.{name} must be an integer >= 0, got {v!r}")
        if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in self.ks):
            raise ValueError(f"ErasureConfig.ks must be integers >= 1, got {list(self.ks)}")
        if len(set(self.ks)) != len(self.ks):
            raise ValueError(f"ErasureConfig.ks has duplicates: {list(self.ks)}")
        if self.n_masks and (not self.mask_rates or any(not 0 < a < 1 for a in self.mask_rates)):
            raise ValueError(f"ErasureConfig.mask_rates must be ablation rates in (0, 1), got {list(self.mask_rates)}")
        if isinstance(self.n_boot, bool) or not isinstance(self.n_boot, (int, np.integer)) or self.n_boot < 100:
            raise ValueError(f"ErasureConfig.n_boot must be >= 100 for a 95% interval, got {self.n_boot!r}")

    def to_dict(self) -> dict:
        """The fields as a dict (part of the cache keys and ``meta.json``)."""
        return asdict(self)


def k_grid(n: int, ks: Sequence[int] = ()) -> tuple[int, ...]:
    """``ks`` checked against ``n`` components (sorted), or the powers of two below ``n // 2`` and ``n // 2``."""
    if n < 1:
        raise ValueError("no components to ablate")
    if ks:
        big = [k for k in ks if k > n]
        if big:
            raise ValueError(f"k values {big} exceed the {n} components of the set: choose k <= {n}")
        return tuple(sorted(int(k) for k in ks))
    half = max(1, n // 2)
    return tuple(sorted({2**i for i in range(int(math.log2(half)) + 1) if 2**i <= half} | {half}))


def random_orders(n: int, n_random: int, seed: int) -> list[np.ndarray]:
    """``n_random`` seeded permutations of ``range(n)`` (the random baseline's rankings)."""
    return [np.random.default_rng([seed, 7_331, r]).permutation(n) for r in range(n_random)]


def heldout_objective_config(config: ObjectiveConfig) -> ObjectiveConfig:
    """The attribution objective's configuration on the held-out seed stream (for J on held-out samples)."""
    return replace(config, seed=config.seed + EVAL_SEED)


# -- targeted rankings ----------------------------------------------------------------------------------------------
def _normalized(df: pd.DataFrame) -> pd.Series:
    """A frame's main scores per component, divided by their L1 norm (concepts whose J differ weigh the same)."""
    r = Ranking.from_frame(df)
    s = pd.Series(r.scores, index=list(r.components), dtype=float)
    return s / max(float(s.abs().sum()), np.finfo(float).tiny)


def contrastive_ranking(target: pd.DataFrame, others: Sequence[pd.DataFrame], name: str | None = None) -> Ranking:
    """Components ordered by ``s_target - mean_o s_o``: one method's L1-normalized scores on the target concept
    minus their mean over the ``others`` (the same method's result frames on other concepts, over the same
    components). A component that matters as much for every concept scores 0; only positive contrasts are ever
    ablated (:meth:`Ranking.top`)."""
    if not others:
        raise ValueError("a contrastive ranking needs at least one other concept's result frame")
    t = _normalized(target)
    o = pd.concat([_normalized(d).reindex(t.index) for d in others], axis=1)
    if o.isna().any().any():
        raise ValueError("the other concepts' frames do not cover the target's components")
    c = (t - o.mean(axis=1)).to_numpy()
    order = np.argsort(-c, kind="stable")
    base = Ranking.from_frame(target)
    refs = [str(d["concept"].iat[0]) for d in others]
    return Ranking(components=tuple(t.index.to_numpy()[order].astype(str)), scores=tuple(c[order].tolist()),
                   method=base.method, name=name or f"{base.method}+contrastive", concept=base.concept,
                   objective=base.objective, info={"references": refs, "rule": "normalized target - mean(others)"})


def per_layer_ranking(ranking: Ranking, layer_of: Mapping[str, str], name: str | None = None) -> Ranking:
    """``ranking`` reordered so that its top ``k`` takes ``k / n_layers`` components from every layer (one more from
    the first ``k mod n_layers``): round ``r`` lists each layer's ``r``-th best component, layers in the order of
    those components' scores. Components not on the ranking's side (never ablated) go last, in their old order, so
    a layer that runs out of them leaves its share to the others. ``layer_of``: component -> its layer (module)."""
    positive = ranking.side == "positive"
    on = [(c, s) for c, s in zip(ranking.components, ranking.scores) if (s > 0 if positive else s < 0)]
    off = [(c, s) for c, s in zip(ranking.components, ranking.scores) if not (s > 0 if positive else s < 0)]
    layers: dict[str, list] = {}
    for c, s in on:  # already in ranking order: each layer's list is best first
        layers.setdefault(layer_of[c], []).append((c, s))
    out = []
    for r in range(max((len(v) for v in layers.values()), default=0)):
        out.extend(sorted((v[r] for v in layers.values() if len(v) > r), key=lambda cs: -cs[1] if positive else cs[1]))
    out += off
    return Ranking(components=tuple(c for c, _ in out), scores=tuple(float(s) for _, s in out),
                   method=ranking.method, name=name or f"{ranking.name}+per-layer", concept=ranking.concept,
                   side=ranking.side, objective=ranking.objective, seconds=ranking.seconds,
                   info={**ranking.info, "budget": "even across layers", "n_layers": len(layers)})


def ablation_means(objective: Objective, comps) -> dict[str, torch.Tensor]:
    """Mean-ablation values of every site of ``comps``: each unit's mean over the objective's anchor prompts (the
    concept word left out) at its samples' noisy inputs and timesteps: what the unit does without the concept. Keyed
    by module path over all its features, so any subset of ``comps`` can be ablated with them."""

    return reference_means(objective, compile_plan(objective.model, comps), branch="anchor")


def _means_digest(means: Mapping[str, torch.Tensor] | None) -> str | None:
    if means is None:
        return None
    h = hashlib.sha256()
    for k in sorted(means):
        h.update(k.encode() + means[k].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


# -- measuring ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ConceptErasure:
    """Everything measured for one concept: the ablated sets, the judge's hits per image, J per sample."""

    concept: str
    components: tuple[str, ...]
    points: pd.DataFrame  # one row per (method, ranking, kind, k): which set it ablated (set_id) and its budget
    sets: np.ndarray  # (U, n) bool: the distinct ablated sets; row 0 is the empty set (the unedited model)
    target_hits: np.ndarray  # (U, n_target) 1.0 where the judge names the concept on a target image
    alone_hits: np.ndarray  # (U, n_alone)
    pair_hits: np.ndarray  # (U, P, n_other): on "other" images, the judge names the value pair p asks for
    pair_masks: np.ndarray  # (P, n_other) 1.0 where the image's prompt asks for pair p
    pairs: tuple[tuple[str, str], ...]  # (attribute, value) of every other value (the retained rate's terms)
    j: np.ndarray  # (U, S) J per set and held-out sample
    scores: Mapping[str, Mapping[str, float]]  # method -> component -> score (for the predictions)
    per_value: pd.DataFrame  # per_value_table of every distinct set (set_id column)
    artifact_hits: np.ndarray  # (U, n_images) 1.0 where some attribute's top class is below ARTIFACT_THRESHOLD


def _set_key(mask: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(mask.astype(bool)).tobytes() + str(len(mask)).encode()).hexdigest()[:20]


def _judged_codes(judged: Judged, held) -> dict[str, torch.Tensor]:
    """The judge's verdicts as value indices and the probabilities of those verdicts (``top_<attribute>``; for the
    artifact rate), as cacheable tensors."""
    out = {}
    for a, values in held.values.items():
        values = list(values)
        out[a] = torch.tensor([values.index(v) for v in judged.table[f"pred_{a}"]], dtype=torch.int64)
        out[f"top_{a}"] = torch.tensor(judged.table[f"top_{a}"].to_numpy(np.float64))
    return out


def _artifacts(codes: Mapping[str, torch.Tensor], held, threshold: float = ARTIFACT_THRESHOLD) -> np.ndarray:
    """``(n_images,)`` 1.0 where the judge's top class of some attribute has a probability below ``threshold``."""
    low = np.zeros(len(held.prompts), bool)
    for a in held.values:
        low |= codes[f"top_{a}"].numpy() < threshold
    return low.astype(float)


def _table_from_codes(codes: Mapping[str, torch.Tensor], held) -> pd.DataFrame:
    table = held.prompts.copy()
    for a, values in held.values.items():
        table[f"pred_{a}"] = [list(values)[i] for i in codes[a].tolist()]
    return table


def measure(model, concept: str, comps, rankings: Mapping[str, Ranking], base: Baseline, j_objective: Objective,
            config: ErasureConfig = ErasureConfig(), store=None, log=None,
            means: Mapping[str, torch.Tensor] | None = None) -> ConceptErasure:
    """Ablate every method's top-k, the random baseline's and the random joint masks; judge and evaluate J.

    ``comps``: the component set the rankings rank (a ComponentSet); ``rankings``: method name -> Ranking over (a
    subset of) ``comps``; ``base``: the unedited model on the held-out set
    (:func:`interp.studies.editing.evaluate.baseline`); ``j_objective``: the objective whose J is reported (on held-out
    samples, see
    :func:`heldout_objective_config`); ``store``: a :class:`interp.core.store.Store` (or None) caching each set's
    verdicts; ``means``: mean-ablate with these values (:func:`ablation_means`) instead of zero-ablating, images and J
    alike.
    """

    say = log or (lambda msg: None)
    addresses = tuple(comps.addresses)
    index = {a: i for i, a in enumerate(addresses)}
    n = len(addresses)
    if RANDOM in rankings:
        raise ValueError(f"{RANDOM!r} names the random baseline; rename that ranking")
    ks = k_grid(n, config.ks)
    held, cfg = base.held, base.config
    rows, sets, set_ids = [], [], {}

    def add(mask: np.ndarray) -> int:
        key = _set_key(mask)
        if key not in set_ids:
            set_ids[key] = len(sets)
            sets.append(mask)
        return set_ids[key]

    add(np.zeros(n, bool))
    scores = {}
    for method, ranking in rankings.items():
        unknown = [c for c in ranking.components if c not in index]
        if unknown:
            raise ValueError(f"{method}'s ranking has components outside the set, e.g. {unknown[:2]}")
        scores[method] = dict(zip(ranking.components, ranking.scores))
        for k in ks:
            edit = ranking.top(k)
            mask = np.zeros(n, bool)
            mask[[index[c] for c in edit.components]] = True
            rows.append({"method": method, "ranking": 0, "kind": "topk", "k": k, "alpha": np.nan,
                         "n_ablated": int(mask.sum()), "set_id": add(mask)})
    for r, order in enumerate(random_orders(n, config.n_random, config.seed)):
        for k in ks:
            mask = np.zeros(n, bool)
            mask[order[:k]] = True
            rows.append({"method": RANDOM, "ranking": r, "kind": "topk", "k": k, "alpha": np.nan, "n_ablated": k,
                         "set_id": add(mask)})
    for i in range(config.n_masks):
        alpha = config.mask_rates[i % len(config.mask_rates)]
        mask = random_masks(1, n, alpha, config.seed * 1_000_003 + 55_117 + i)[0].numpy()
        rows.append({"method": RANDOM, "ranking": i, "kind": "mask", "k": int(mask.sum()), "alpha": alpha,
                     "n_ablated": int(mask.sum()), "set_id": add(mask)})
    S = np.stack(sets)
    store = store if store is not None else Store(None)
    judge = base.judge
    entry = store.entry(f"erasure-{concept}", {
        "model": model_fingerprint(model), "device": str(model.device), "concept": concept,
        "components": components_hash(comps), "n_components": n, "eval": cfg.to_dict(),
        "prompts": pd.util.hash_pandas_object(held.prompts.astype(str), index=False).sum().item(),
        "judge": None if judge is None else [judge.name, module_digest(judge.weights())],
        **({} if means is None else {"means": _means_digest(means)}),  # zero-ablation keys stay as they were
        **_feature_key(model, comps),  # features: the SAEs' digests (another SAE at the site never reads these)
    })
    say(f"{concept}: {len(S) - 1} distinct ablated sets to generate and judge ({len(rows)} curve points)")
    codes = []
    for u, mask in enumerate(S):
        if u == 0:
            codes.append(_judged_codes(base.judged, held))
            continue
        edit = AblationEdit(tuple(addresses[i] for i in np.flatnonzero(mask)), name="erasure", concept=concept,
                            means=means)
        key = f"set-{_set_key(mask)}"
        got = entry.cached_chunk(key)
        if got is None or any(f"top_{a}" not in got for a in held.values):  # (a chunk cached before artifacts)
            got = _judged_codes(judge_images(model, edit, held, cfg, judge), held)
            entry.put_chunk(key, got, {})
        codes.append(got)
    # J under every set at once (one mask per row), on the held-out samples; the empty set is the intact model
    sets_hash = hashlib.sha256(np.packbits(S).tobytes() + str(S.shape).encode()).hexdigest()[:16]
    j_entry = store.entry(f"erasure-j-{concept}", {**j_objective.identity(), "components": components_hash(comps),
                                                   "sets": sets_hash, **_feature_key(model, comps),
                                                   **({} if means is None else {"means": _means_digest(means)})})
    J = masked_values(j_objective, comps, torch.from_numpy(S), entry=j_entry, chunk=64,
                      tag="j" if means is None else "j-mean",
                      means=None if means is None else dict(means)).double().numpy()
    tables = [_table_from_codes(c, held) for c in codes]
    target = (held.prompts["set"] == "target").to_numpy()
    alone = (held.prompts["set"] == "alone").to_numpy()
    other = (held.prompts["set"] == "other").to_numpy()
    a0 = held.attribute
    th = np.stack([(t.loc[target, f"pred_{a0}"] == concept).to_numpy(float) for t in tables])
    ah = np.stack([(t.loc[alone, f"pred_{a0}"] == concept).to_numpy(float) for t in tables])
    pairs = [(a, v) for a, values in held.values.items() for v in values if not (a == a0 and v == concept)]
    asked = held.prompts.loc[other]
    pm = np.stack([(asked[a] == v).to_numpy(float) for a, v in pairs]) if pairs else np.zeros((0, other.sum()))
    ph = np.stack([np.stack([(t.loc[other, f"pred_{a}"] == asked[a]).to_numpy(float) for a, _ in pairs])
                   if pairs else np.zeros((0, other.sum())) for t in tables])
    before = Judged(tables[0], torch.empty(0), np.zeros((0, 0)), 0.0)
    pv = pd.concat([per_value_table(before, Judged(t, torch.empty(0), np.zeros((0, 0)), 0.0), held)
                   .assign(concept=concept, set_id=u) for u, t in enumerate(tables)], ignore_index=True)
    points = pd.DataFrame(rows)
    points.insert(0, "concept", concept)
    art = np.stack([_artifacts(c, held) for c in codes])
    return ConceptErasure(concept, addresses, points, S, th, ah, ph * pm[None], pm, tuple(pairs), J, scores, pv, art)


def _feature_key(model, comps) -> dict:
    """The cache-key part of SAE features: the digests of their dictionaries (nothing for other granularities, so
    their keys stay as they were)."""
    if not any(c.granularity == "feature" for c in comps):
        return {}

    return {"features": identity(model, comps)}


# -- statistics ---------------------------------------------------------------------------------------------------
def _counts(n: int, n_boot: int, rng) -> np.ndarray:
    """(n_boot + 1, n) resampling multiplicities; row 0 is the sample itself (all ones)."""
    if n == 0:
        return np.ones((n_boot + 1, 0))
    idx = rng.integers(0, n, size=(n_boot, n))
    c = np.zeros((n_boot, n))
    np.add.at(c, (np.arange(n_boot)[:, None], idx), 1.0)
    return np.vstack([np.ones((1, n)), c])


def _rates(hits: np.ndarray, C: np.ndarray) -> np.ndarray:
    """(U, B+1) rate of each set under each resample (NaN without images)."""
    if hits.shape[1] == 0:
        return np.full((hits.shape[0], C.shape[0]), np.nan)
    return hits @ C.T / C.sum(1)[None]


def _retained(e: ConceptErasure, C: np.ndarray) -> np.ndarray:
    """(U, B+1) retained rate: mean over the other values of after / before (values whose before-rate is 0 left
    out), as :func:`interp.studies.editing.evaluate.evaluate_edit` defines it, under each resample of the other
    images."""
    if not e.pairs:
        return np.full((len(e.sets), C.shape[0]), np.nan)
    n_p = e.pair_masks @ C.T  # (P, B+1) images asking for each value
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without any drawn value: NaN, not a warning
        rate = np.einsum("upi,bi->upb", e.pair_hits, C) / n_p[None]  # (U, P, B+1)
        ratio = np.where(rate[:1] > 0, rate / rate[:1], np.nan)  # after / before under the same resample
        return np.nanmean(ratio, axis=1)


@dataclass(frozen=True, eq=False)
class Resampled:
    """Each metric of each distinct set under the sample (column 0) and ``n_boot`` bootstrap resamples."""

    concept_rate: np.ndarray
    alone_rate: np.ndarray
    retained_rate: np.ndarray
    j: np.ndarray  # mean J over the (resampled) held-out samples
    j_ratio: np.ndarray  # J after / J of the intact model on the same resample (paired)
    artifact_rate: np.ndarray  # share of all held-out images with an attribute the judge cannot read


def resample(e: ConceptErasure, n_boot: int = 1000, seed: int = 0) -> Resampled:
    """Bootstrap over images (target, alone and other images resampled separately; all of them together for the
    artifact rate) and over J's samples."""
    rng = np.random.default_rng([seed, 4_243])
    ct = _counts(e.target_hits.shape[1], n_boot, rng)
    ca = _counts(e.alone_hits.shape[1], n_boot, rng)
    co = _counts(e.pair_masks.shape[1], n_boot, rng)
    cj = _counts(e.j.shape[1], n_boot, rng)
    j = e.j @ cj.T / cj.sum(1)
    cx = _counts(e.artifact_hits.shape[1], n_boot, np.random.default_rng([seed, 4_244]))  # (the others' draws kept)
    return Resampled(_rates(e.target_hits, ct), _rates(e.alone_hits, ca), _retained(e, co), j, j / j[:1],
                     _rates(e.artifact_hits, cx))


def _band(x: np.ndarray) -> tuple[float, float, float]:
    """(sample, 2.5%, 97.5%) of a vector whose first entry is the sample's value."""
    rest = x[1:][np.isfinite(x[1:])]
    if not np.isfinite(x[0]) or len(rest) == 0:
        return float(x[0]), np.nan, np.nan
    lo, hi = np.percentile(rest, [2.5, 97.5])
    return float(x[0]), float(lo), float(hi)


def _method_curves(e: ConceptErasure, res: Resampled) -> dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Per method (the random baseline averaged over its orders): k values (0 first) and per metric (K, B+1)."""
    out = {}
    pts = e.points[e.points["kind"] == "topk"]
    for method, g in pts.groupby("method", sort=False):
        ks = np.array(sorted(g["k"].unique()))
        metrics = {}
        for m in METRICS:
            arr = getattr(res, m)
            rows = [arr[0]]
            for k in ks:
                ids = g.loc[g["k"] == k, "set_id"].to_numpy()
                rows.append(arr[ids].mean(0))  # the mean over the random orders (one id for a method)
            metrics[m] = np.stack(rows)
        n_abl = [0] + [float(g.loc[g["k"] == k, "n_ablated"].mean()) for k in ks]
        out[method] = (np.concatenate([[0], ks]), metrics, np.array(n_abl))
    return out


def _auc(ks: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Trapezoid area of ``y`` (K, B+1) over ``log(1 + k) / log(1 + k_max)`` (0 to 1)."""
    x = np.log1p(ks) / np.log1p(ks.max())
    return np.trapezoid(y, x, axis=0) if hasattr(np, "trapezoid") else np.trapz(y, x, axis=0)


def curve_tables(erasures: Sequence[ConceptErasure], n_boot: int = 1000, seed: int = 0):
    """The tidy curves (one row per concept, method, k and metric, with its bootstrap band), the areas under the
    concept-rate, alone-rate and retained curves, and the per-set resamples (for :func:`prediction_table`)."""
    curves, areas, resampled = [], [], {}
    for e in erasures:
        res = resample(e, n_boot, seed)
        resampled[e.concept] = res
        for method, (ks, metrics, n_abl) in _method_curves(e, res).items():
            for m, arr in metrics.items():
                for i, k in enumerate(ks):
                    v, lo, hi = _band(arr[i])
                    curves.append({"concept": e.concept, "method": method, "k": int(k), "n_ablated": n_abl[i],
                                   "metric": m, "value": v, "lo": lo, "hi": hi})
                if m in ("concept_rate", "alone_rate", "retained_rate"):
                    v, lo, hi = _band(_auc(ks, arr))
                    areas.append({"concept": e.concept, "method": method, "metric": m, "auc": v, "lo": lo, "hi": hi,
                                  "k_max": int(ks.max())})
    return (pd.DataFrame(curves, columns=CURVE_COLUMNS),
            pd.DataFrame(areas, columns=["concept", "method", "metric", "auc", "lo", "hi", "k_max"]), resampled)


def point_table(erasures: Sequence[ConceptErasure], resampled: Mapping[str, Resampled]) -> pd.DataFrame:
    """Every measured point (method top-k, each random order, each random mask) with its sample values."""
    out = []
    for e in erasures:
        res = resampled[e.concept]
        p = e.points.copy()
        for m in ("concept_rate", "alone_rate", "retained_rate", "artifact_rate"):
            p[m] = getattr(res, m)[p["set_id"].to_numpy(), 0]
        p["j"] = e.j.mean(1)[p["set_id"].to_numpy()]
        p["j_intact"] = float(e.j[0].mean())
        out.append(p)
    return pd.concat(out, ignore_index=True)[POINT_COLUMNS] if out else pd.DataFrame(columns=POINT_COLUMNS)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan
    return float(stats.spearmanr(x, y)[0])


def prediction_table(erasures: Sequence[ConceptErasure], resampled: Mapping[str, Resampled], n_boot: int = 1000,
                     seed: int = 0) -> pd.DataFrame:
    """Per method and concept, Spearman between the method's predicted effect of a joint ablation (the sum of its
    scores over the ablated set) and the measured drop of the concept rate (and of J) over the method's top-k sets
    and the random joint masks, with a percentile bootstrap interval (points and images resampled together)."""
    rows = []
    for e in erasures:
        res = resampled[e.concept]
        masks = e.points[e.points["kind"] == "mask"]
        B = res.concept_rate.shape[1] - 1
        for method, sc in e.scores.items():
            own = e.points[(e.points["method"] == method) & (e.points["kind"] == "topk")]
            ids = np.concatenate([own["set_id"].to_numpy(), masks["set_id"].to_numpy()]).astype(int)
            s = np.array([sc.get(a, 0.0) for a in e.components])
            pred = e.sets[ids].astype(float) @ s
            targets = {"concept_rate": res.concept_rate[0][:1] - res.concept_rate,  # drop, (U, B+1)
                       "j": res.j[:1] - res.j}
            rng = np.random.default_rng([seed, 911])
            picks = [np.arange(len(ids))] + [rng.integers(0, len(ids), len(ids)) for _ in range(B)]
            for target, drop in targets.items():
                d = drop[ids]
                vals = np.array([_spearman(pred[p], d[p, b]) for b, p in enumerate(picks)])
                v, lo, hi = _band(vals)
                rows.append({"concept": e.concept, "method": method, "target": target, "n_points": len(ids),
                             "n_topk": len(own), "n_masks": len(masks), "spearman": v, "lo": lo, "hi": hi})
    return pd.DataFrame(rows, columns=["concept", "method", "target", "n_points", "n_topk", "n_masks", "spearman",
                                       "lo", "hi"])


# -- figure -------------------------------------------------------------------------------------------------------
def erasure_figure(curves: pd.DataFrame,
                   metrics: Sequence[str] = ("concept_rate", "retained_rate", "artifact_rate", "j_ratio")) -> Figure:
    """Erasure curves: one column per concept, one row per metric; each method's curve with its bootstrap band over
    k (symmetric-log axis, so k = 0, the unedited model, is on it), the random baseline dashed in grey."""
    import seaborn as sns

    concepts = list(dict.fromkeys(curves["concept"]))
    if not concepts:
        return plots._empty("no erasure curves")
    methods = [m for m in dict.fromkeys(curves["method"]) if m != RANDOM]
    palette = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    palette[RANDOM] = (0.45, 0.45, 0.45)
    fig = Figure(figsize=(4.3 * len(concepts) + 1.8, 3.0 * len(metrics) + 0.6), layout="constrained")
    axes = fig.subplots(len(metrics), len(concepts), squeeze=False)
    labels = {"concept_rate": "concept rate (target images)", "alone_rate": "concept rate (concept alone)",
              "retained_rate": "retained rate of other values", "j_ratio": "one-step J, share of intact",
              "artifact_rate": f"artifact rate (a top class < {ARTIFACT_THRESHOLD:g})"}
    for j, c in enumerate(concepts):
        for i, m in enumerate(metrics):
            ax = axes[i][j]
            sub = curves[(curves["concept"] == c) & (curves["metric"] == m)]
            for method in methods + [RANDOM]:
                g = sub[sub["method"] == method].sort_values("k")
                if g.empty:
                    continue
                ls = "--" if method == RANDOM else "-"
                ax.plot(g["k"], g["value"], ls, marker="o", ms=3, color=palette[method], label=method)
                ax.fill_between(g["k"], g["lo"], g["hi"], color=palette[method], alpha=0.15, lw=0)
            ax.set_xscale("symlog", linthresh=1)
            ks = sorted(sub["k"].unique())
            ax.set_xticks(ks, [str(k) for k in ks], fontsize=7)
            ax.minorticks_off()
            ax.grid(True, color="0.9")
            if m != "j_ratio":
                ax.set_ylim(-0.03, max(1.03, float(np.nanmax(sub["hi"].to_numpy(float), initial=1.0)) + 0.03))
            if i == 0:
                ax.set_title(f"erasing '{c}'")
            if i == len(metrics) - 1:
                ax.set_xlabel("k = components ablated jointly (top of each ranking)")
            if j == 0:
                ax.set_ylabel(labels.get(m, m))
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False, fontsize=8)
    fig.suptitle("erasure curves on held-out prompts and seeds (bands: bootstrap 95% over images)")
    return fig


# -- report -------------------------------------------------------------------------------------------------------
def findings(tables: Mapping[str, pd.DataFrame]) -> list[str]:
    """A few sentences with the run's numbers: per concept, the method whose curve falls earliest (area under the
    concept-rate curve) against the random baseline, and the method whose sum of scores best predicts the drop."""
    auc, curves, pred = tables["auc"], tables["curves"], tables["prediction"]
    out = []
    for concept, g in auc[auc["metric"] == "concept_rate"].groupby("concept", sort=False):
        ranked = g[g["method"] != RANDOM].sort_values("auc")
        if ranked.empty:
            continue
        best = ranked.iloc[0]
        c = curves[(curves["concept"] == concept) & (curves["metric"] == "concept_rate")]
        kmax = int(c["k"].max())
        end = c[c["k"] == kmax].set_index("method")["value"]
        ret = curves[(curves["concept"] == concept) & (curves["metric"] == "retained_rate") & (curves["k"] == kmax)]
        ret = ret.set_index("method")["value"]
        art = curves[(curves["concept"] == concept) & (curves["metric"] == "artifact_rate")]
        art0 = float(art.loc[art["k"] == 0, "value"].iloc[0]) if len(art) else np.nan
        art = art[art["k"] == kmax].set_index("method")["value"]
        start = float(c.loc[c["k"] == 0, "value"].iloc[0])
        rnd = g[g["method"] == RANDOM]
        m = best["method"]
        s = (f"Erasing '{concept}': {m}'s ranking erases earliest (area under the concept-rate curve "
             f"{best['auc']:.2f} [{best['lo']:.2f}, {best['hi']:.2f}]"
             + (f"; random orders {rnd['auc'].iat[0]:.2f}" if len(rnd) else "") + f"); at k = {kmax} the concept "
             f"rate goes from {start:.2f} to {end.get(m, np.nan):.2f} with {ret.get(m, np.nan):.2f} of the other "
             f"values retained and an artifact rate of {art.get(m, np.nan):.2f} (unedited {art0:.2f})"
             + (f" (random: {end[RANDOM]:.2f}, retained {ret.get(RANDOM, np.nan):.2f})" if RANDOM in end else "")
             + ".")
        out.append(s)
    p = pred[pred["target"] == "concept_rate"].dropna(subset=["spearman"])
    for concept, g in p.groupby("concept", sort=False):
        b = g.sort_values("spearman", ascending=False).iloc[0]
        out.append(f"'{concept}': {b['method']}'s summed scores rank the measured drop of the concept rate best "
                   f"(Spearman {b['spearman']:.2f} [{b['lo']:.2f}, {b['hi']:.2f}] over {int(b['n_points'])} joint "
                   "ablations: its top-k sets and the random masks).")
    return out


def report_sections(tables: Mapping[str, pd.DataFrame], figure_uri: str, eval_config: EvalConfig,
                    n_components: int) -> list[dict]:
    """The erasure report's sections (also usable as a section of another report)."""
    auc = tables["auc"].pivot_table(index=["concept", "method"], columns="metric", values="auc").reset_index()
    pred = tables["prediction"]
    wide = pred.assign(value=[f"{v:.2f} [{lo:.2f}, {hi:.2f}]" if np.isfinite(v) else "\u2014"
                              for v, lo, hi in zip(pred["spearman"], pred["lo"], pred["hi"])])
    wide = wide.pivot_table(index=["concept", "method"], columns="target", values="value", aggfunc="first")
    return [
        {"title": "Erasure curves",
         "text": f"Each method's top-k components of {n_components} are zero-ablated together; "
                 f"{eval_config.n_images} held-out images per concept ({eval_config.n_target} full captions with the "
                 f"concept, {eval_config.n_alone} naming it alone, {eval_config.n_other} asking for other values), "
                 f"{eval_config.steps} denoising steps, the same prompts and initial noises at every k. Concept rate: "
                 "share of target images the judge assigns to the concept. Retained rate: mean over the other values "
                 "of their rate after / before. Artifact rate: share of all held-out images in which the judge "
                 "cannot read some attribute, i.e. its probability of that attribute's top class is below "
                 f"{ARTIFACT_THRESHOLD:g} (no value holds a majority). "
                 "J ratio: the one-step objective on held-out samples, after / "
                 "before. Bands: bootstrap 95% over images (J: over samples, paired with the intact model). Areas: "
                 "trapezoid over log(1 + k) / log(1 + k_max), k = 0 included (lower concept rate and higher "
                 "retained rate are better).",
         "figures": [("Erasure curves (random baseline dashed)", figure_uri)],
         "tables": [("Area under the curves", auc)],
         "details": [{"title": f"Every curve point with its band ({len(tables['curves'])} rows)",
                      "tables": [("Curves", tables["curves"])]},
                     {"title": "Areas with their bootstrap intervals", "tables": [("Areas", tables["auc"])]}]},
        {"title": "End-to-end prediction",
         "text": "Spearman correlation between each method's predicted effect of a joint ablation (the sum of its "
                 "scores over the ablated components) and the measured drop of the concept rate (and of J), over the "
                 "method's own top-k sets and the random joint masks (shared by all methods); bootstrap 95% "
                 "intervals over points and images together.",
         "tables": [("Spearman [95% interval]", wide.reset_index())],
         "details": [{"title": f"Every measured joint ablation ({len(tables['points'])} rows)",
                      "tables": [("Points", tables["points"])]},
                     {"title": f"Per-value rates ({len(tables['per_value'])} rows)",
                      "tables": [("Per value", tables["per_value"])]}]},
    ]


def erasure_study(model, comps, rankings: Mapping[str, Mapping[str, Ranking]], objective: ObjectiveConfig,
                  eval_config: EvalConfig, config: ErasureConfig, judge, alternatives: Mapping[str, list | None],
                  store=None, log=None, means: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                  concepts: Mapping | None = None) -> dict:
    """The whole measurement for several concepts: ``rankings[concept][name]`` are measured (:func:`measure`) on
    the held-out images of ``eval_config`` judged by ``judge`` (``alternatives[concept]``: the values weighed
    against, None on the concept world), J on the held-out evaluation set of ``objective``; ``means[concept]``
    switches to mean-ablation; ``concepts[concept]``: what J's objective is built on, when not the word itself
    (a text concept with the judge's alternatives, as the attribution's objective was). Returns ``tables``, the figure (PNG bytes ``figure_png`` and a data URI ``figure``),
    the report ``sections`` and ``findings`` sentences. The weights are checked bitwise unchanged afterwards (ablations are multipliers)."""

    before = model.state_fingerprint()
    erasures = []
    for concept, ranks in rankings.items():
        base = baseline(model, concept, eval_config, judge, alternatives.get(concept))
        j_obj = Objective(model, (concepts or {}).get(concept, concept), heldout_objective_config(objective))
        erasures.append(measure(model, concept, comps, ranks, base, j_obj, config, store, log,
                                means=None if means is None else means.get(concept)))
    changed = [n for n, p in model.parameters() if not torch.equal(p, before[n])]
    if changed:
        raise RuntimeError(f"weights changed by the erasure measurement: {changed[:3]}")
    curves, auc, resampled = curve_tables(erasures, config.n_boot, config.seed)
    tables = {"curves": curves, "auc": auc,
              "prediction": prediction_table(erasures, resampled, config.n_boot, config.seed),
              "points": point_table(erasures, resampled),
              "per_value": pd.concat([e.per_value for e in erasures], ignore_index=True)}
    png = plots.fig_to_png(erasure_figure(curves))  # module attributes: a test may draw placeholders
    uri = plots.png_to_data_uri(png)
    return {"tables": tables, "figure": uri, "figure_png": png,
            "sections": report_sections(tables, uri, eval_config, len(comps)), "findings": findings(tables)}
