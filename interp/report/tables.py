"""Compact tables for the top of a report section: one row per method, a column per concept or ablation rate, and
an estimate with its interval in each cell ("0.98 [0.97, 0.99]"). The tidy tables they are made from (one row per
concept, method variant and rate, every interval in its own column) go into the collapsed evidence below them. The
rows are variants (:mod:`interp.core.results`), shown under the heading "method": a method's main estimate is named as
the method.

The cells are text so that estimate and interval read together; the report's table script sorts such a cell by its
leading number.
"""

from __future__ import annotations

import math

import pandas as pd


def _num(v, fmt: str) -> str:
    return "\u2014" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _cost(cost: pd.DataFrame | None, methods) -> pd.Series:
    if cost is None or "forward_equivalents" not in cost:
        return pd.Series(math.nan, index=list(methods))
    return cost.groupby("variant")["forward_equivalents"].mean().reindex(list(methods))


def correlation_pivot(corr: pd.DataFrame, methods, cost: pd.DataFrame | None = None,
                      stat: str = "spearman") -> pd.DataFrame:
    """Method x concept: ``stat`` with its bootstrap 95% interval, and the method's mean cost per concept."""
    c = corr[corr["variant"].isin(methods)]
    concepts = list(dict.fromkeys(c["concept"]))
    out = pd.DataFrame({"method": [m for m in methods if m in set(c["variant"])]})
    fpe = _cost(cost, out["method"])
    out["forward-pass equivalents"] = [_num(fpe.get(m), ",.0f") for m in out["method"]]
    for concept in concepts:
        g = c[c["concept"] == concept].set_index("variant")
        out[concept] = [f"{_num(g.at[m, stat], '.2f')} [{_num(g.at[m, stat + '_lo'], '.2f')}, "
                        f"{_num(g.at[m, stat + '_hi'], '.2f')}]" if m in g.index else "\u2014" for m in out["method"]]
    return out


def lds_pivot(acc: pd.DataFrame, methods) -> pd.DataFrame:
    """Method x ablation rate: mean LDS (Spearman) over concepts and, in brackets, the lowest concept's; with the
    method's cost. Rows in order of cost."""
    a = acc[acc["variant"].isin(methods)]
    rows = []
    for m, g in a.groupby("variant", sort=False):
        row = {"method": m, "forward-pass equivalents": g["forward_evals"].mean()}
        for alpha, h in g.groupby("alpha", sort=True):
            v = h["lds_spearman"]
            row[f"LDS \u03b1={alpha:g}: mean (lowest)"] = f"{_num(v.mean(), '.3f')} ({_num(v.min(), '.3f')})"
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out = out.sort_values(["forward-pass equivalents", "method"], kind="stable").reset_index(drop=True)
    out["forward-pass equivalents"] = [_num(v, ",.0f") for v in out["forward-pass equivalents"]]
    return out


def versus_pivot(vs: pd.DataFrame, method: str) -> pd.DataFrame:
    """Concept x ablation rate for one method against the baseline of :func:`interp.report.evaluation.lds_versus`:
    'LDS - baseline's [95% interval]'."""
    d = vs[vs["variant"] == method]
    if d.empty:
        return pd.DataFrame()
    out = pd.DataFrame({"concept": list(dict.fromkeys(d["concept"]))})
    for alpha, h in d.groupby("alpha", sort=True):
        h = h.set_index("concept")
        out[f"\u03b1={alpha:g}"] = [
            f"{h.at[c, 'difference']:+.3f} [{h.at[c, 'difference_lo']:+.3f}, {h.at[c, 'difference_hi']:+.3f}]"
            if c in h.index else "\u2014" for c in out["concept"]]
    return out


def cost_pivot(cost: pd.DataFrame, methods) -> pd.DataFrame:
    """Per method, mean over concepts of forward and backward passes, forward-pass equivalents and wall seconds."""
    c = cost[cost["variant"].isin(methods)]
    cols = [x for x in ("forward_evals", "backward_evals", "forward_equivalents", "seconds") if x in c]
    out = c.groupby("variant", sort=False)[cols].mean().reset_index().rename(columns={"variant": "method"})
    if "forward_equivalents" in out:
        out = out.sort_values(["forward_equivalents", "method"], kind="stable").reset_index(drop=True)
    names = {"forward_evals": "forward passes", "backward_evals": "backward passes",
             "forward_equivalents": "forward-pass equivalents", "seconds": "seconds"}
    return out.rename(columns=names)
