"""The sentences that open a report: which method to trust, at what cost, with the run's own numbers.

Every sentence is generated from the run's tables (nothing here holds a measured number), by fixed rules stated in
the docstrings, so a run whose results differ gets different sentences:

- :func:`compare_findings` (the comparison, :mod:`interp.studies.compare`): the method to trust for *single* ablations
  is the cheapest whose lowest per-concept Spearman correlation with true ablation is within ``tolerance`` of the best
  method's lowest; the method to trust for *joint* ablations is the one with the highest mean linear datamodeling
  score (LDS) at the largest ablation rate (ties go to the cheaper). Budget and rate variants (rows whose
  ``variant`` is not the method's main estimate, e.g. ``coar@179``, ``maskgrad@0.2-K4``) compete for joint
  ablations, since choosing the rate and budget is the point there.
- :func:`edit_findings` (the editing report): per concept, the edit that erases most while the other attribute
  values keep at least ``retained_min`` of their rate, and the strongest erasure regardless of side effects.

Costs are forward-pass equivalents over the evaluation set (a backward pass counts as two), as in
:func:`interp.report.evaluation.cost_table`.
"""

from __future__ import annotations

import math

import pandas as pd

from interp import methods as registry
from interp.core.results import is_main
from interp.report.evaluation import method_labels, reference_method, reference_users


def label(variant: str, labels: dict | None = None, method: str | None = None) -> str:
    """An estimate's display name: its method's; a variant (``method`` given, and not the variant's own name) is
    its method's name with the variant in brackets."""
    labels = {**method_labels(), **(labels or {})}
    if variant in labels:
        return labels[variant]
    return f"{labels[method]} ({variant})" if method in labels else variant


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _fpe(cost: pd.DataFrame | None, method: str) -> float:
    if cost is None or "forward_equivalents" not in cost:
        return math.nan
    v = cost.loc[cost["variant"] == method, "forward_equivalents"]
    return float(v.mean()) if len(v) else math.nan


def _cost_text(v: float) -> str:
    return "an unrecorded cost" if math.isnan(v) else f"{v:,.0f} forward-pass equivalents"


def single_trust(corr: pd.DataFrame, cost: pd.DataFrame | None = None, reference: str | None = None,
                 exclude=None, tolerance: float = 0.02) -> dict:
    """Per main method its lowest and highest per-concept Spearman with the reference; the trusted method (see the
    module docstring) and the methods that agree as closely. Empty when no method has a correlation."""
    reference = reference_method(reference)
    exclude = reference_users() if exclude is None else exclude
    c = corr.dropna(subset=["spearman"])
    c = c[(c["variant"] != reference) & is_main(c)]
    if c.empty:
        return {}
    per = {}
    for m, g in c.groupby("method", sort=True):
        w = g.loc[g["spearman"].idxmin()]
        per[m] = {"worst": float(w["spearman"]), "worst_concept": w["concept"], "worst_lo": float(w["spearman_lo"]),
                  "worst_hi": float(w["spearman_hi"]), "best": float(g["spearman"].max()), "fpe": _fpe(cost, m),
                  "n_concepts": int(len(g))}
    candidates = [m for m in per if m not in exclude] or list(per)
    top = max(per[m]["worst"] for m in candidates)
    agree = [m for m in candidates if per[m]["worst"] >= top - tolerance]
    trusted = min(agree, key=lambda m: (math.inf if math.isnan(per[m]["fpe"]) else per[m]["fpe"], -per[m]["worst"]))
    return {"per": per, "trusted": trusted, "agree": agree, "top": top,
            "weak": [m for m in per if m not in agree and m not in exclude and per[m]["worst"] < top - tolerance]}


def joint_trust(acc: pd.DataFrame, reference: str | None = None, alpha: float | None = None) -> dict:
    """At ablation rate ``alpha`` (default the largest): per method the mean, lowest (and its concept) LDS over
    concepts and the mean cost, per variant (a method's main estimate is named as the method); the trusted one is the
    highest mean (ties to the cheaper). Empty without rows."""
    reference = reference_method(reference)
    a = acc.dropna(subset=["lds_spearman"])
    if a.empty:
        return {}
    alpha = float(a["alpha"].max()) if alpha is None else alpha
    a = a[(a["alpha"] == alpha) & (a["variant"] != reference)]
    if a.empty:
        return {}
    per = {}
    for m, g in a.groupby("variant", sort=True):
        w = g.loc[g["lds_spearman"].idxmin()]
        fpe = float(g["forward_evals"].mean()) if "forward_evals" in g else math.nan
        per[m] = {"mean": float(g["lds_spearman"].mean()), "worst": float(w["lds_spearman"]),
                  "worst_concept": w["concept"], "fpe": fpe,
                  "n_masks": int(g["n_masks"].max()) if "n_masks" in g else None}
    best = max(per, key=lambda m: (round(per[m]["mean"], 3), -(per[m]["fpe"] if not math.isnan(per[m]["fpe"]) else 0)))
    return {"alpha": alpha, "per": per, "trusted": best}


def compare_findings(tables: dict, reference: str | None = None, labels: dict | None = None,
                     exclude=None, tolerance: float = 0.02, n_components: int | None = None,
                     baseline: str | None = None) -> list[str]:
    """The comparison's findings in a few sentences (see the module docstring for the rules).

    ``tables`` holds :func:`interp.report.evaluation.correlations` as ``correlations``, and optionally ``cost`` (with
    ``forward_equivalents``), ``accuracy_vs_cost`` (LDS with cost per method, concept and rate) and
    ``lds_vs_<baseline>`` (:func:`interp.report.evaluation.lds_versus` against the LDS baseline, COAR by default).
    """

    reference, baseline = reference_method(reference), baseline or registry.baseline()
    cost = tables.get("cost")
    methods = {}  # the method of each variant, to name a variant after its method
    for table in (tables.get("accuracy_vs_cost"), cost):
        if table is not None and len(table):
            methods.update(zip(table["variant"], table["method"]))
    L = lambda v: label(v, labels, methods.get(v))  # noqa: E731
    ref = L(reference)
    out = []
    single = single_trust(tables["correlations"], cost, reference, exclude, tolerance)
    if not single:
        return [f"No method has a defined correlation with {ref}."]
    per, t = single["per"], single["trusted"]
    s = per[t]
    comps = f"the {n_components:,} components" if n_components else "the components"
    others = [L(m) for m in single["agree"] if m != t]
    ref_cost = _fpe(cost, reference)
    out.append(
        f"Single ablations: trust {L(t)}. It ranks {comps} as {ref} does (Spearman {s['worst']:.2f} to "
        f"{s['best']:.2f} over {s['n_concepts']} concepts; lowest for '{s['worst_concept']}', {s['worst']:.2f} "
        f"[95% CI {s['worst_lo']:.2f}, {s['worst_hi']:.2f}]) at {_cost_text(s['fpe'])} per concept"
        + (f", against {ref_cost:,.0f} for {ref}." if not math.isnan(ref_cost) else ".")
        + (f" {_cap(_join(others))} {'agrees' if len(others) == 1 else 'agree'} as closely (lowest Spearman "
           f"{min(per[m]['worst'] for m in single['agree']):.2f} or more) at the same or a higher cost." if others else "")
    )
    if single["weak"]:
        weak = sorted(single["weak"], key=lambda m: -per[m]["worst"])
        out.append("Less faithful one at a time: " + "; ".join(
            f"{L(m)} (Spearman {per[m]['worst']:.2f} to {per[m]['best']:.2f})" for m in weak) + ".")
    out += corruption_findings(tables.get("corruption"), labels)
    acc = tables.get("accuracy_vs_cost")
    joint = joint_trust(acc, reference) if acc is not None and len(acc) else {}
    if not joint:
        return out
    alpha, jp, b = joint["alpha"], joint["per"], joint["trusted"]
    jb = jp[b]
    masks = f", {jb['n_masks']} held-out masks per concept" if jb["n_masks"] else ""
    sentence = (f"Joint ablations of {alpha:.0%} of the components (linear datamodeling score, LDS{masks}): trust "
                f"{L(b)}, mean LDS {jb['mean']:.3f} (lowest for '{jb['worst_concept']}', {jb['worst']:.3f}) at "
                f"{_cost_text(jb['fpe'])}")
    B = L(baseline)
    if baseline in jp and b != baseline:
        jc = jp[baseline]
        share = jb["fpe"] / jc["fpe"] if jc["fpe"] else math.nan
        sentence += (f", {share:.1%} of {B}'s {jc['fpe']:,.0f} ({B}: mean {jc['mean']:.3f}, lowest "
                     f"{jc['worst']:.3f})") if not math.isnan(share) else ""
    out.append(sentence + ".")
    vs = tables.get(f"lds_vs_{baseline}")
    if vs is not None and len(vs):
        d = vs[(vs["variant"] == b) & (vs["alpha"] == alpha)]
        if len(d):
            lo_row, hi_row = d.loc[d["difference"].idxmin()], d.loc[d["difference"].idxmax()]
            better = int((d["difference_lo"] > 0).sum())
            worse = int((d["difference_hi"] < 0).sum())
            out.append(
                f"Against {B} on the same masks its LDS differs by {lo_row['difference']:+.3f} "
                f"('{lo_row['concept']}', 95% interval [{lo_row['difference_lo']:+.3f}, "
                f"{lo_row['difference_hi']:+.3f}]) to {hi_row['difference']:+.3f} ('{hi_row['concept']}', "
                f"[{hi_row['difference_lo']:+.3f}, {hi_row['difference_hi']:+.3f}]): significantly better for "
                f"{better}, worse for {worse} of {len(d)} concepts (paired bootstrap over masks)."
            )
    if t in jp and t != b:
        a = acc.dropna(subset=["lds_spearman"])
        a0 = float(a["alpha"].min())
        m0 = a[(a["alpha"] == a0) & (a["variant"] == t)]["lds_spearman"].mean()
        jt = jp[t]
        out.append(
            f"{_cap(L(t))}, trusted one at a time, has mean LDS {m0:.3f} at \u03b1 = {a0:g} and "
            f"{jt['mean']:.3f} at \u03b1 = {alpha:g} (lowest for '{jt['worst_concept']}', {jt['worst']:.3f}): "
            + ("first order does not carry over to joint ablations of that size."
               if jt["worst"] < jb["worst"] - tolerance else "first order carries over to joint ablations here.")
        )
    return out


def corruption_findings(table: pd.DataFrame | None, labels: dict | None = None) -> list[str]:
    """Per method that corrupts its input (causal tracing), one sentence naming the concepts whose corruption is
    not valid (some noise draw does not lower J by the required share:
    :func:`interp.report.evaluation.corruption_table`), with what each draw did, and the range removed for the others.
    Nothing when every corruption is valid."""
    if table is None or not len(table):
        return []
    out = []
    for method, g in table.groupby("method", sort=True):
        bad = g[~g["valid"].astype(bool)]
        if bad.empty:
            continue
        parts = [f"'{c}' (J changed by {', '.join(f'{0.0 - r:+.0%}' for r in b['removed'])})"
                 for c, b in bad.groupby("concept", sort=True)]
        good = g[g["valid"].astype(bool)]
        rest = (f" For the other {good['concept'].nunique()} concepts its draws remove "
                f"{good['removed'].min():.0%} to {good['removed'].max():.0%} of J." if len(good) else "")
        n = bad["concept"].nunique()
        out.append(f"{_cap(label(method, labels))}'s corruption does not remove {_join(parts)} in every noise draw, so "
                   f"its scores for {'that concept are' if n == 1 else 'those concepts are'} not restorations of the "
                   f"concept: read them as unreliable." + rest)
    return out


def edit_findings(table: pd.DataFrame, retained_min: float = 0.9) -> list[str]:
    """Per concept: the edit that lowers the target's rate most while the other values keep at least
    ``retained_min`` of their rate, and the strongest erasure regardless. ``table`` is
    :func:`interp.studies.editing.sweep_table` (columns concept, label, target_before, target_after, retained_rate)."""
    out = []
    for concept, g in table.groupby("concept", sort=False):
        g = g.dropna(subset=["target_after", "retained_rate"])
        if g.empty:
            continue
        before = float(g["target_before"].iloc[0])
        order = ["target_after", "retained_rate"]
        kept = g[g["retained_rate"] >= retained_min].sort_values(order, ascending=[True, False])
        strongest = g.sort_values(order, ascending=[True, False]).iloc[0]
        text = f"Erasing '{concept}' (rate {before:.2f} on held-out prompts unedited): "
        if len(kept):
            k = kept.iloc[0]
            text += (f"best trade-off {k['label']}, rate {k['target_after']:.2f} ({100 * (k['target_after'] - before):+.0f} "
                     f"points) while the other values keep {k['retained_rate']:.2f} of their rate")
        else:
            text += f"no edit keeps {retained_min:.0%} of the other values' rate"
        if not len(kept) or strongest["label"] != kept.iloc[0]["label"]:
            text += (f"; strongest erasure {strongest['label']}, rate {strongest['target_after']:.2f} "
                     f"({100 * (strongest['target_after'] - before):+.0f} points), keeping "
                     f"{strongest['retained_rate']:.2f} of the rest")
        out.append(text + ".")
    return out
