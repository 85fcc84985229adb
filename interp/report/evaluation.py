"""Evaluation: turns tidy result frames (:mod:`interp.core.results`) into tables.

Every function compares methods with a *reference* method, named by a parameter; the default is the registry's
reference (:func:`interp.methods.reference`: true single-component ablation, the ground truth). Rows are matched between a method and the reference on
``(concept, component)``. Tables have one row per estimate: ``method`` (the registered method) and
``variant`` (its main estimate is named as the method; budget and rate variants have their own names, see
:mod:`interp.core.results`); a reference or baseline names a variant.

- :func:`correlations` / :func:`correlations_by_layer`: Pearson, Spearman and Kendall correlation of each method's
  scores with the reference's, with percentile bootstrap 95% confidence intervals (components resampled).
- :func:`topk_agreement`: precision of a method's top-k (and bottom-k) components against the reference's.
- :func:`lds` / :func:`lds_table`: the linear datamodel score: how well summed attributions predict the objective
  after *joint* ablation of random component sets (held-out masks), as in COAR and datamodels;
  :func:`lds_versus`: a method's LDS minus a baseline's on the same masks, with a paired bootstrap interval.
- :func:`cost_table`: forward/backward passes and wall time from the frames' metadata.
- :func:`summary_sentences`: one plain sentence per concept naming the method that agrees best with the reference.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from interp import methods
from interp.core.results import costs, is_main, meta_key
from interp.methods.tracing import corruption_check

#: Keys of a correlation table's rows; the statistics follow them (:data:`CORR_COLUMNS`).
CORR_KEYS = ["concept", "method", "variant"]
CORR_COLUMNS = CORR_KEYS + [
    "n",
    "pearson", "pearson_lo", "pearson_hi",
    "spearman", "spearman_lo", "spearman_hi",
    "kendall", "kendall_lo", "kendall_hi",
]



def method_labels() -> dict[str, str]:
    """Display names of the registered methods (each method's ``label``); other names are shown as they are."""

    return {n: m.label or n for n, m in methods.REGISTRY.items()}


def reference_method(reference: str | None = None) -> str:
    """``reference``, or the registry's reference method (:func:`interp.methods.reference`)."""

    return reference or methods.reference()


def reference_users() -> tuple[str, ...]:
    """Methods whose scores are partly the reference's measurements (``Capabilities.uses_reference``): they do not
    compete in "which method agrees best", their agreement being partly by construction."""

    return tuple(n for n, m in methods.REGISTRY.items() if m.capabilities.uses_reference)


_PART_ORDER = {"text_encoder": 0, "unet": 1}

# Above this many shared components Kendall's bootstrap (then one scipy call per resample, O(n log n) each) is cut
# to _KENDALL_BOOT_CAP resamples so that a table stays a matter of seconds.
_KENDALL_FULL_N = 5000
_KENDALL_BOOT_CAP = 200
#: Up to this many components, bootstrap Kendall intervals come from n x n sign matrices, O(n^2) per resample but
#: one matrix product for all (faster than scipy's O(n log n) call per resample below ~1,000 components).
_KENDALL_MATRIX_N = 1000
# Resampled index matrices are processed in chunks of about this many entries to bound memory.
_CHUNK_ENTRIES = 2_000_000


# -- matching ------------------------------------------------------------------------------------------------------
def _paired(df: pd.DataFrame, reference: str, keys: Sequence[str]) -> pd.DataFrame:
    """Non-reference rows with the reference's score alongside (column ``ref``), matched on (concept, component)."""
    reference = reference_method(reference)
    ref = df.loc[df["variant"] == reference, ["concept", "component", "score"]]
    if ref.empty:
        raise ValueError(f"no rows of the reference method {reference!r}; methods present: "
                         f"{sorted(df['variant'].unique())}")
    if ref.duplicated(["concept", "component"]).any():
        dup = ref.loc[ref.duplicated(["concept", "component"], keep=False), ["concept", "component"]].head(3)
        raise ValueError(
            f"reference {reference!r} has several rows for the same (concept, component), e.g. "
            f"{list(map(tuple, dup.to_numpy()))}; give each variant its own variant name"
        )
    other = df[df["variant"] != reference]
    # A component may appear once per group; several rows would be silently averaged or double-counted otherwise.
    uniq = list(dict.fromkeys([*keys, "concept", "component"]))
    if other.duplicated(uniq).any():
        dup = other.loc[other.duplicated(uniq, keep=False), uniq].head(3)
        raise ValueError(
            f"several rows for the same {tuple(uniq)}, e.g. {list(map(tuple, dup.to_numpy()))}; give each variant "
            f"its own variant name or add the distinguishing column to `by`"
        )
    return other.merge(ref.rename(columns={"score": "ref"}), on=["concept", "component"], how="left")


def _groups_with_pairs(paired: pd.DataFrame, keys: list[str]):
    """Yield (key values, x = method scores, y = reference scores) per group; groups with no match give n = 0."""
    for key, g in paired.groupby(keys, sort=True, dropna=False, observed=True):
        g = g.dropna(subset=["ref"]).sort_values("component")
        yield (key if isinstance(key, tuple) else (key,)), g["score"].to_numpy(float), g["ref"].to_numpy(float)


# -- statistics ----------------------------------------------------------------------------------------------------
def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair; a constant row gives NaN (not a warning or an exception)."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    den = np.sqrt((xc * xc).sum(axis=1) * (yc * yc).sum(axis=1))
    num = (xc * yc).sum(axis=1)
    out = np.full(len(x), np.nan)
    ok = den > 0
    out[ok] = np.clip(num[ok] / den[ok], -1.0, 1.0)
    return out


def _resampled_ranks(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Average ranks (as scipy.stats.rankdata) of ``values[idx]`` within each row, without sorting every row.

    Each resampled value's rank is (number of drawn values strictly below it) + (its multiplicity + 1) / 2; the
    counts come from one bincount over the original values' dense codes, so this is O(rows x n).
    """
    uniq, codes = np.unique(values, return_inverse=True)
    m = len(uniq)
    c = codes[idx]
    offset = (np.arange(len(idx)) * m)[:, None]
    counts = np.bincount((c + offset).ravel(), minlength=len(idx) * m).reshape(len(idx), m).astype(float)
    below = np.cumsum(counts, axis=1) - counts
    return np.take_along_axis(below + (counts + 1.0) / 2.0, c, axis=1)


def _resampled_kendall(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of ``(x[i], y[i])`` for every row ``i`` of ``idx`` (resamples of the n points), as
    scipy.stats.kendalltau computes it, by matrix products instead of one sort per resample.

    A resample holds point ``a`` ``c_a`` times. Its pairs of points ``a != b`` number ``c_a c_b``, so with
    ``S[a, b] = sign(x_a - x_b) sign(y_a - y_b)`` concordant minus discordant pairs is ``c^T S c / 2``, and the
    pairs tied in x (copies of one point included) number ``(c^T T_x c - n) / 2`` with ``T_x[a, b] = [x_a = x_b]``.
    """
    n = len(x)
    sx, sy = np.sign(x[:, None] - x[None, :]), np.sign(y[:, None] - y[None, :])
    # Every entry and sum is an integer below n^2 <= 2^24, so float32 products are exact.
    mats = ((sx * sy).astype(np.float32), (sx == 0).astype(np.float32), (sy == 0).astype(np.float32))
    n0 = n * (n - 1) / 2
    out = np.empty(len(idx))
    step = max(1, _CHUNK_ENTRIES // n)
    for s in range(0, len(idx), step):
        block = idx[s:s + step]
        offset = (np.arange(len(block)) * n)[:, None]
        counts = np.bincount((block + offset).ravel(), minlength=len(block) * n).reshape(len(block), n)
        counts = counts.astype(np.float32)
        pq, tx, ty = (np.einsum("bi,bi->b", counts @ m, counts).astype(float) for m in mats)
        den = np.sqrt((n0 - (tx - n) / 2) * (n0 - (ty - n) / 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s:s + step] = np.where(den > 0, np.clip(pq / 2 / den, -1.0, 1.0), np.nan)
    return out


def _quiet(fn, *args):
    """A scipy statistic that returns NaN instead of warning or raising on degenerate input."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(fn(*args)[0])
        except ValueError:
            return math.nan


def _percentile_ci(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def _corr_with_ci(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int, level: float,
                  n_boot_kendall: int | None) -> dict:
    n = len(x)
    out = {"n": n}
    for name in ("pearson", "spearman", "kendall"):
        out[name] = out[f"{name}_lo"] = out[f"{name}_hi"] = math.nan
    if n < 3:
        return out
    out["pearson"] = _quiet(stats.pearsonr, x, y)
    out["spearman"] = _quiet(stats.spearmanr, x, y)
    out["kendall"] = _quiet(stats.kendalltau, x, y)
    if n_boot <= 0:
        return out
    # One index matrix per group from the same seed: every method of a concept sees the same resamples.
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    pear, spear = np.empty(n_boot), np.empty(n_boot)
    step = max(1, _CHUNK_ENTRIES // n)
    for s in range(0, n_boot, step):
        block = idx[s:s + step]
        pear[s:s + step] = _rowwise_pearson(x[block], y[block])
        spear[s:s + step] = _rowwise_pearson(_resampled_ranks(x, block), _resampled_ranks(y, block))
    if n_boot_kendall is None:
        n_boot_kendall = n_boot if n <= _KENDALL_FULL_N else min(n_boot, _KENDALL_BOOT_CAP)
    if n <= _KENDALL_MATRIX_N:  # n x n matrices: exact, and ~100x faster than one scipy call per resample
        kend = _resampled_kendall(x, y, idx[:n_boot_kendall])
    else:
        kend = np.array([_quiet(stats.kendalltau, x[i], y[i]) for i in idx[:n_boot_kendall]])
    for name, boot in (("pearson", pear), ("spearman", spear), ("kendall", kend)):
        if math.isfinite(out[name]):
            out[f"{name}_lo"], out[f"{name}_hi"] = _percentile_ci(boot, level)
    return out


# -- correlation tables --------------------------------------------------------------------------------------------
def correlations(df: pd.DataFrame, reference: str | None = None, by: Sequence[str] = ("concept", "method", "variant"),
                 n_boot: int = 1000, seed: int = 0, *, ci: float = 0.95,
                 n_boot_kendall: int | None = None) -> pd.DataFrame:
    """Correlation of each group's scores with the reference's, over the components both scored.

    Groups are the distinct values of ``by`` (the reference method itself excluded); Pearson, Spearman and Kendall
    (tau-b) come from scipy.stats, each with a percentile bootstrap ``ci`` interval over ``n_boot`` resamples of the
    components (with replacement; Pearson and Spearman vectorized over all resamples). Kendall's interval uses all
    ``n_boot`` resamples up to 5,000 shared components and 200 above, unless ``n_boot_kendall`` says otherwise.
    Fewer than 3 shared components, or constant scores, give NaN. A group sharing no component with the reference
    is kept with ``n = 0``.
    """
    keys = list(dict.fromkeys(by))
    paired = _paired(df, reference, keys)
    records = []
    for key, x, y in _groups_with_pairs(paired, keys):
        records.append({**dict(zip(keys, key)), **_corr_with_ci(x, y, n_boot, seed, ci, n_boot_kendall)})
    lead = [c for c in CORR_KEYS if c in keys] + [k for k in keys if k not in CORR_KEYS]
    return pd.DataFrame(records, columns=lead + CORR_COLUMNS[len(CORR_KEYS):])


def correlations_by_layer(df: pd.DataFrame, reference: str | None = None, level: str = "layer", n_boot: int = 200,
                          seed: int = 0, **kwargs) -> pd.DataFrame:
    """:func:`correlations` per layer (``level="layer"``) or per stage (``level="block"``).

    Adds the ``level`` column plus ``model_part`` and ``depth`` (the smallest depth in the group) for ordering;
    rows are sorted text encoder first, then UNet, each by depth.
    """
    if level not in ("layer", "block"):
        raise ValueError(f"level must be 'layer' or 'block', not {level!r}")
    out = correlations(df, reference, by=("concept", "method", "variant", level), n_boot=n_boot, seed=seed, **kwargs)
    where = df.groupby(level, observed=True).agg(model_part=("model_part", "first"), depth=("depth", "min"))
    out = out.merge(where.reset_index(), on=level, how="left")
    out["_part"] = out["model_part"].map(_PART_ORDER).fillna(len(_PART_ORDER))
    out = out.sort_values(CORR_KEYS + ["_part", "depth", level], kind="stable").drop(columns="_part")
    cols = CORR_KEYS + [level, "model_part", "depth"] + CORR_COLUMNS[len(CORR_KEYS):]
    return out[cols].reset_index(drop=True)


# -- top-k agreement -----------------------------------------------------------------------------------------------
def topk_agreement(df: pd.DataFrame, reference: str | None = None,
                   fractions: Sequence[float] = (0.01, 0.05, 0.10)) -> pd.DataFrame:
    """Precision of each method's top-k components against the reference's top-k, per concept and fraction.

    ``k = max(1, round(fraction * n))`` with n the components both scored. ``side="positive"`` compares the k
    highest scores, ``side="negative"`` the k lowest (most negative). Ties are broken by component address so the
    table is deterministic. ``chance`` is the expected precision of a random ranking, k / n.
    """
    paired = _paired(df, reference, ["concept", "method", "variant"])
    records = []
    for (concept, method, variant), x, y in _groups_with_pairs(paired, ["concept", "method", "variant"]):
        n = len(x)
        for fraction in fractions:
            k = max(1, int(round(fraction * n))) if n else 0
            for side, sign in (("positive", -1.0), ("negative", 1.0)):
                if n == 0:
                    precision = math.nan
                else:
                    # components are sorted by address already; a stable sort keeps that order among ties
                    top_m = set(np.argsort(sign * x, kind="stable")[:k])
                    top_r = set(np.argsort(sign * y, kind="stable")[:k])
                    precision = len(top_m & top_r) / k
                records.append({"concept": concept, "method": method, "variant": variant, "side": side,
                                "fraction": fraction, "k": k, "n": n, "precision": precision,
                                "chance": k / n if n else math.nan})
    return pd.DataFrame(records, columns=["concept", "method", "variant", "side", "fraction", "k", "n", "precision",
                                          "chance"])


# -- linear datamodel score ----------------------------------------------------------------------------------------
def lds(scores: pd.Series, masks: np.ndarray, components: Sequence[str], j_true: np.ndarray,
        j_intact: float) -> dict:
    """Linear datamodel score of attributions on held-out joint ablations.

    ``masks[i, c] = 1`` means component ``components[c]`` is ablated in mask i. Scores are positive when ablating a
    component lowers J, so the linear prediction is ``j_hat = j_intact - masks @ scores``; the result holds the
    Spearman and Pearson correlation (scipy.stats) of ``j_hat`` with the measured ``j_true`` across masks (NaN if
    either is constant). Scores of components outside ``components`` are ignored (never ablated).
    """
    masks = np.asarray(masks, dtype=float)
    j_true = np.asarray(j_true, dtype=float).reshape(-1)
    components = [str(c) for c in components]
    if masks.ndim != 2 or masks.shape[1] != len(components):
        raise ValueError(f"masks have shape {masks.shape}; expected (n_masks, {len(components)}) for the components")
    if len(j_true) != masks.shape[0]:
        raise ValueError(f"{len(j_true)} values of J for {masks.shape[0]} masks")
    if scores.index.has_duplicates:
        raise ValueError("scores have duplicate components")
    missing = pd.Index(components).difference(scores.index)
    if len(missing):
        raise ValueError(
            f"scores lack {len(missing)} of the {len(components)} masked components, e.g. {list(missing[:3])}"
        )
    j_hat = float(j_intact) - masks @ scores.reindex(components).to_numpy(float)
    return {"spearman": _quiet(stats.spearmanr, j_hat, j_true), "pearson": _quiet(stats.pearsonr, j_hat, j_true),
            "n_masks": int(masks.shape[0])}


def lds_table(df: pd.DataFrame, heldout: dict, *, methods: Sequence[str] | None = None,
              missing: str = "raise") -> pd.DataFrame:
    """:func:`lds` for every concept and method of ``df`` on the held-out masks of that concept.

    ``heldout`` maps ``(concept, alpha)`` to ``dict(masks=..., components=[...], j=..., j_intact=...)``; concepts
    without held-out masks are skipped. ``methods`` limits the variants (default: all, the reference included, whose
    LDS is that of the sum of single-component effects). ``missing`` says what to do when a method did not score
    some masked component: ``"raise"`` (ValueError), ``"zero"`` (it predicts no effect for them, e.g. CAD on
    attention) or ``"skip"`` (leave that method out for that concept).
    """
    if missing not in ("raise", "zero", "skip"):
        raise ValueError(f"missing must be 'raise', 'zero' or 'skip', not {missing!r}")
    records = []
    for (concept, alpha), h in heldout.items():
        sub = df[df["concept"] == concept]
        names = _variants(sub)
        for variant in sorted(names) if methods is None else methods:
            s = sub[sub["variant"] == variant]
            if s.empty:
                continue
            scores = s.set_index(s["component"].astype(str))["score"]
            absent = pd.Index([str(c) for c in h["components"]]).difference(scores.index)
            if len(absent) and missing == "skip":
                continue
            if len(absent) and missing == "zero":
                scores = pd.concat([scores, pd.Series(0.0, index=absent)])
            r = lds(scores, h["masks"], h["components"], h["j"], h["j_intact"])
            records.append({"concept": concept, "method": names[variant], "variant": variant, "alpha": alpha,
                            "lds_spearman": r["spearman"], "lds_pearson": r["pearson"], "n_masks": r["n_masks"]})
    return pd.DataFrame(records, columns=["concept", "method", "variant", "alpha", "lds_spearman", "lds_pearson",
                                          "n_masks"])


def _variants(rows: pd.DataFrame) -> dict[str, str]:
    """Each variant of ``rows`` with its method."""
    pairs = rows[["variant", "method"]].drop_duplicates()
    return dict(zip(pairs["variant"], pairs["method"]))


def _row_spearman(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``pred`` with the same row of ``truth`` (both (B, n)), vectorized."""
    rp = stats.rankdata(pred, axis=1)
    rt = stats.rankdata(truth, axis=1)
    rp -= rp.mean(1, keepdims=True)
    rt -= rt.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rp * rt).sum(1) / np.sqrt((rp**2).sum(1) * (rt**2).sum(1))


def lds_versus(df: pd.DataFrame, heldout: dict, baseline: str | None = None, *, n_boot: int = 1000, seed: int = 0,
               level: float = 0.95) -> pd.DataFrame:
    """Is a method's LDS better than ``baseline``'s on the same held-out masks? A paired bootstrap.

    For every concept, ablation rate and method that scored every masked component: the Spearman LDS of the method
    and of the baseline, their difference, and a percentile interval of the difference from resampling the held-out
    masks (the same resample for both, so the noise they share cancels). An interval that contains 0 is a tie at
    this many masks. ``baseline`` defaults to the registry's (:func:`interp.methods.baseline`: COAR).
    """
    if baseline is None:
        baseline = methods.baseline()
    rng = np.random.default_rng(seed)
    records = []
    for (concept, alpha), h in heldout.items():
        sub = df[df["concept"] == concept]
        comps = [str(c) for c in h["components"]]
        masks, j = np.asarray(h["masks"], float), np.asarray(h["j"], float).reshape(-1)

        def prediction(variant):
            s = sub[sub["variant"] == variant].set_index("component")["score"]
            s.index = s.index.astype(str)
            return None if pd.Index(comps).difference(s.index).size else -(masks @ s.reindex(comps).to_numpy(float))

        base = prediction(baseline)
        if base is None:
            continue
        idx = rng.integers(0, len(j), size=(n_boot, len(j)))
        base_boot = _row_spearman(base[idx], j[idx])
        base_lds = _quiet(stats.spearmanr, base, j)
        names = _variants(sub)
        for variant in sorted(names):
            pred = prediction(variant)
            if variant == baseline or pred is None:
                continue
            lds_m = _quiet(stats.spearmanr, pred, j)
            diff = _row_spearman(pred[idx], j[idx]) - base_boot
            lo, hi = np.nanpercentile(diff, [50 * (1 - level), 50 * (1 + level)])
            records.append({"concept": concept, "alpha": alpha, "method": names[variant], "variant": variant,
                            "baseline": baseline,
                            "lds_spearman": lds_m, "baseline_lds_spearman": base_lds, "difference": lds_m - base_lds,
                            "difference_lo": lo, "difference_hi": hi, "n_masks": len(j)})
    return pd.DataFrame(records, columns=["concept", "alpha", "method", "variant", "baseline", "lds_spearman",
                                          "baseline_lds_spearman", "difference", "difference_lo", "difference_hi",
                                          "n_masks"])


def _run_metas(df: pd.DataFrame) -> dict[tuple[str, str], dict]:
    """``{(method, concept): that run's metadata}`` from ``df.attrs["meta"]``, for the pairs ``df`` holds. The meta
    of a concatenated frame is keyed by :func:`interp.core.results.meta_key`; a single method's frame carries its meta
    dict directly."""
    meta = df.attrs.get("meta") or {}
    pairs = df[["method", "concept"]].drop_duplicates()
    if meta and not all(isinstance(v, dict) and "/" in k for k, v in meta.items()):
        # a single frame's own meta, not keyed by method and concept (meta_key's "method/concept")
        if len(pairs) != 1:
            raise ValueError("df.attrs['meta'] is not keyed by method and concept but df holds several of them")
        meta = {meta_key(*pairs.iloc[0]): meta}
    found = {(mth, c): meta.get(meta_key(mth, c)) for mth, c in pairs.itertuples(index=False)}
    return {k: v for k, v in found.items() if v is not None}


# -- cost ----------------------------------------------------------------------------------------------------------
def cost_table(df: pd.DataFrame) -> pd.DataFrame:
    """Forward passes, backward passes and seconds per (concept, method, variant): the typed
    :class:`~interp.core.results.Cost` records of the run metadata in ``df.attrs["meta"]``
    (:func:`interp.core.results.costs`).

    The meta of a concatenated frame is keyed by :func:`interp.core.results.meta_key`
    (:func:`interp.core.results.concat`); a single method's frame carries its meta dict directly. Budget and rate
    variants have no wall time of their own
    (NaN); a run without a recorded cost gives a row of NaN.
    """
    records = []
    for (method, concept), m in _run_metas(df).items():
        if "cost" not in m:  # a frame built by hand, without a recorded cost
            records.append({"concept": concept, "method": method, "variant": method, "forward_evals": math.nan,
                            "backward_evals": math.nan, "seconds": math.nan})
            continue
        for variant, cost in costs({"method": method, **m}).items():
            records.append({"concept": concept, "method": method, "variant": variant,
                            "forward_evals": cost.forward_evals, "backward_evals": cost.backward_evals,
                            "seconds": math.nan if cost.seconds is None else cost.seconds})
    out = pd.DataFrame(records, columns=["concept", "method", "variant", "forward_evals", "backward_evals", "seconds"])
    return out.sort_values(["concept", "method", "variant"], kind="stable").reset_index(drop=True)


# -- corruption (causal tracing) ------------------------------------------------------------------------------------
def corruption_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per (concept, method, noise draw) of every run that corrupts its input (causal tracing), from the run
    metadata in ``df.attrs["meta"]``: J clean and corrupted (means over the evaluation set), the share of J the
    draw removes, and whether the concept's corruption is valid (every draw removes at least
    :data:`interp.methods.tracing.WEAK_CORRUPTION`; see :func:`interp.methods.tracing.corruption_check`). Empty
    (with the columns) when no run corrupts."""

    cols = ["concept", "method", "noise", "j_clean", "j_corrupted", "removed", "valid"]
    records = []
    for (method, concept), m in _run_metas(df).items():
        if "j_corrupted" not in m:
            continue
        clean, corrupted = float(m["j_clean"]), [float(j) for j in m["j_corrupted"]]
        check = corruption_check(clean, corrupted)
        records += [{"concept": concept, "method": method, "noise": k, "j_clean": clean, "j_corrupted": j,
                     "removed": r, "valid": check["corruption_valid"]}
                    for k, (j, r) in enumerate(zip(corrupted, check["corruption_removed"]))]
    out = pd.DataFrame(records, columns=cols)
    return out.sort_values(["method", "concept", "noise"], kind="stable").reset_index(drop=True)


# -- sentences -----------------------------------------------------------------------------------------------------
def summary_sentences(corr_table: pd.DataFrame, reference: str | None = None,
                      labels: dict | None = None, exclude: tuple[str, ...] | None = None) -> list[str]:
    """One sentence per concept naming the method with the highest Spearman correlation with the reference.

    ``labels`` maps method names to display names (default: each method's ``label``). Budget and rate variants
    (rows whose ``variant`` is not the method's main estimate) and the methods in ``exclude`` (default
    :func:`reference_users`) do not compete: screen-then-verify's top scores *are* the reference's measurements, so
    its agreement is partly by construction.
    """
    reference = reference_method(reference)
    exclude = reference_users() if exclude is None else exclude
    labels = {**method_labels(), **(labels or {})}
    ref = labels.get(reference, reference)
    out = []
    for concept, g in corr_table.groupby("concept", sort=True):
        g = g.dropna(subset=["spearman"])
        g = g[is_main(g) & ~g["method"].isin(exclude)]
        if g.empty:
            out.append(f"For concept '{concept}', no method has a defined correlation with {ref}.")
            continue
        best = g.loc[g["spearman"].idxmax()]
        name = labels.get(best["method"], best["method"])
        out.append(
            f"For concept '{concept}', {name} agrees best with {ref}: Spearman r = {best['spearman']:.2f} "
            f"[{best['spearman_lo']:.2f}, {best['spearman_hi']:.2f}] (Pearson {best['pearson']:.2f})."
        )
    return out
