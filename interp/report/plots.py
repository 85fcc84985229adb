"""Figures from tidy result frames (:mod:`interp.core.results`) and evaluation tables (:mod:`interp.report.evaluation`).

Every function returns a :class:`matplotlib.figure.Figure` and never shows or saves it. Figures are built as plain
``Figure`` objects (not through pyplot's figure manager), so they work under any backend, Agg included, and do not
pile up in pyplot's state; :func:`fig_to_base64_png` turns one into a data URI for the HTML report.

Layers are ordered by ``depth`` within each ``model_part``: text encoder first, then UNet, and labelled with
:func:`interp.core.components.short_layer`. A ``method`` argument names an estimate by its ``variant``
(:mod:`interp.core.results`): a method's main estimate is named as the method, so ``"coar"`` is COAR's main estimate and
``"coar@179"`` its budget variant.
"""

from __future__ import annotations

import base64
import io
import math
import sys
import warnings

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from scipy import stats

from interp import methods
from interp.core.components import short_layer
from interp.report.evaluation import reference_method

_PART_ORDER = {"text_encoder": 0, "unet": 1}


# -- helpers -------------------------------------------------------------------------------------------------------
def _layer_index(df: pd.DataFrame, extra: str | None = None) -> pd.DataFrame:
    """The distinct (model_part, layer[, extra]) rows of ``df`` in plotting order, with a ``label`` column."""
    keys = ["model_part", "layer"] + ([extra] if extra else [])
    idx = df.groupby(keys, observed=True)["depth"].min().reset_index()
    idx["_part"] = idx["model_part"].map(_PART_ORDER).fillna(len(_PART_ORDER))
    idx = idx.sort_values(["_part", "depth"] + keys, kind="stable").drop(columns="_part").reset_index(drop=True)
    labels = [short_layer(str(l), str(p)) for p, l in zip(idx["model_part"], idx["layer"])]
    if extra:
        labels = [f"{lab} {e}" for lab, e in zip(labels, idx[extra])]
    idx["label"] = labels
    return idx


def _empty(message: str, figsize=(6, 2)) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    ax.set_axis_off()
    return fig


def _tidy_ticks(ax, x: bool = True, y: bool = True, nbins: int = 4) -> None:
    """Few ticks, and an offset / power-of-ten label at the axis end instead of long tick labels that collide
    (effects of single components are ~1e-5)."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    for on, axis in ((x, ax.xaxis), (y, ax.yaxis)):
        if not on:
            continue
        axis.set_major_locator(MaxNLocator(nbins=nbins))
        fmt = ScalarFormatter(useMathText=True)
        fmt.set_powerlimits((-2, 3))
        axis.set_major_formatter(fmt)


def _height(n_rows: int) -> float:
    return min(40.0, max(3.0, 0.28 * n_rows + 1.5))


def _corr(x, y, fn) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(fn(x, y)[0]) if len(x) >= 3 else math.nan
        except ValueError:
            return math.nan


# -- localization --------------------------------------------------------------------------------------------------
def localization_shares(df: pd.DataFrame, method: str) -> pd.DataFrame:
    """Per (model_part, layer, concept): positive and |negative| attribution mass of ``method`` as shares of the
    concept's total |score| (columns ``pos``, ``neg``; the two sum to 1 over a concept's layers)."""
    rows = df[df["variant"] == method]
    if rows.empty:
        return pd.DataFrame(columns=["model_part", "layer", "concept", "pos", "neg"])
    rows = rows.assign(pos=rows["score"].clip(lower=0), neg=-rows["score"].clip(upper=0), mass=rows["score"].abs())
    total = rows.groupby("concept", observed=True)["mass"].sum()
    per = rows.groupby(["model_part", "layer", "concept"], observed=True)[["pos", "neg"]].sum().reset_index()
    # .to_numpy(float): mapping over a pyarrow-backed string column would give pyarrow doubles, which heatmaps reject
    denom = per["concept"].map(total).to_numpy(float, copy=True)
    denom[denom == 0] = np.nan
    per["pos"] = per["pos"].to_numpy(float) / denom
    per["neg"] = per["neg"].to_numpy(float) / denom
    return per


def localization_grid(df: pd.DataFrame, methods, titles: dict | None = None, title: str | None = None) -> Figure:
    """Where each method puts each concept, side by side on one colour scale: a layer x concept heatmap per method
    (columns) of the positive (top row, supports the concept) and |negative| (bottom row, opposes it) attribution
    mass, each concept's column divided by the concept's total |score|. Layers are shared across panels (a method
    that scores no component of a layer leaves it blank)."""
    methods = [m for m in methods if m in set(df["variant"])]
    if not methods:
        return _empty("no rows for the requested methods")
    shares = {m: localization_shares(df, m) for m in methods}
    rows = df
    order = _layer_index(rows[rows["variant"].isin(methods)])
    concepts = sorted(rows.loc[rows["variant"].isin(methods), "concept"].unique())
    vmax = max(float(np.nanmax(sh[["pos", "neg"]].to_numpy(float), initial=0.0)) for sh in shares.values()) or 1.0
    panel_w = 0.32 * len(concepts) + 0.5
    label_w = 0.075 * max(len(str(x)) for x in order["label"]) + 0.6
    fig = Figure(figsize=(label_w + panel_w * len(methods) + 1.0, 2 * (0.2 * len(order) + 0.9) + 0.5),
                 layout="constrained")
    axes = fig.subplots(2, len(methods), sharex=True, sharey=True, squeeze=False)
    mesh = None
    for j, m in enumerate(methods):
        for i, (col, cmap) in enumerate((("pos", "Reds"), ("neg", "Blues"))):
            ax = axes[i, j]
            grid = shares[m].pivot_table(index=["model_part", "layer"], columns="concept", values=col,
                                         aggfunc="sum", observed=True)
            grid = grid.reindex(pd.MultiIndex.from_frame(order[["model_part", "layer"]])).reindex(columns=concepts)
            grid = grid.astype(float).set_axis(order["label"].to_numpy(), axis=0)
            sns.heatmap(grid, ax=ax, cmap=cmap, vmin=0, vmax=vmax, cbar=False, linewidths=0.3, linecolor="white",
                        yticklabels=True, square=False)
            ax.tick_params(axis="y", labelleft=j == 0)  # shared rows: labels once (yticklabels=False would clear all)
            ax.set_xlabel("")
            ax.set_ylabel(("supports (score > 0)" if col == "pos" else "opposes (score < 0)") if j == 0 else "")
            ax.tick_params(axis="y", labelrotation=0, labelsize=8)
            ax.tick_params(axis="x", labelrotation=90, labelsize=8)
            if i == 0:
                ax.set_title((titles or {}).get(m, m), fontsize=9)
            if j == len(methods) - 1:
                mesh = ax.collections[0]
                fig.colorbar(mesh, ax=axes[i, :].tolist(), shrink=0.9, pad=0.01,
                             label="share of |score|" if i == 0 else "share of |score|")
    fig.suptitle(title or "attribution mass per layer, one colour scale (each concept divided by its total |score|)",
                 fontsize=10)
    return fig


def localization_heatmap(df: pd.DataFrame, method: str) -> Figure:
    """One method's :func:`localization_grid`: layer x concept shares of positive and |negative| mass."""
    if df.query("variant == @method").empty:
        return _empty(f"no rows for method {method!r}")
    return localization_grid(df, [method], title=f"{method}: attribution mass per layer "
                                                 "(each concept divided by its total |score|)")


# -- agreement with the reference ----------------------------------------------------------------------------------
def scatter_vs_reference(df: pd.DataFrame, concept: str, reference: str | None = None, methods=None,
                         ncol: int = 7) -> Figure:
    """Small multiples: each method's score (y) against the reference's (x) on shared components, with Pearson r and
    Spearman rho and the line y = x. The x axis (the reference) is shared; each y axis keeps its own range, so that
    one method on another scale (causal tracing's restored fractions) does not flatten the others. ``methods`` picks
    the panels (default every method sharing components with the reference)."""

    reference = reference_method(reference)
    rows = df[df["concept"] == concept]
    ref = rows.loc[rows["variant"] == reference, ["component", "score"]].rename(columns={"score": "ref"})
    others = sorted(m for m in rows["variant"].unique() if m != reference) if methods is None else \
        [m for m in methods if m != reference]
    # methods sharing no component with the reference (e.g. tracing's whole layers vs single units) get no panel
    shared = [m for m in others if rows.loc[rows["variant"] == m, "component"].isin(ref["component"]).any()]
    if ref.empty or not shared:
        return _empty(f"concept {concept!r}: no method shares components with {reference!r}")
    ncol = min(ncol, len(shared))
    nrow = math.ceil(len(shared) / ncol)
    fig = Figure(figsize=(1.75 * ncol + 0.9, 1.9 * nrow + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False, sharex=True)).ravel()
    families = sorted(rows["family"].dropna().unique())
    palette = dict(zip(families, sns.color_palette("tab10", len(families))))
    for k, (ax, method) in enumerate(zip(axes, shared)):
        pair = rows[rows["variant"] == method].merge(ref, on="component")
        x, y = pair["ref"].to_numpy(float), pair["score"].to_numpy(float)
        sns.scatterplot(data=pair.astype({"family": object}), x="ref", y="score", hue="family", palette=palette,
                        s=8, alpha=0.6, linewidth=0, ax=ax, legend=len(families) > 1 and k == 0)
        ax.axline((0, 0), slope=1, color="0.6", lw=0.6, ls="--", zorder=0)  # y = x: a perfect estimate
        ax.axhline(0, color="0.85", lw=0.5, zorder=0)
        ax.axvline(0, color="0.85", lw=0.5, zorder=0)
        r, rho = _corr(x, y, stats.pearsonr), _corr(x, y, stats.spearmanr)
        ax.set_title(f"{method}\n\u03c1 = {rho:.2f}, r = {r:.2f}", fontsize=8.5)
        ax.set_xlabel(f"{reference}" if k >= len(shared) - ncol else "", fontsize=8)
        ax.set_ylabel("score" if k % ncol == 0 else "", fontsize=8)
        ax.tick_params(labelsize=7)
        _tidy_ticks(ax, nbins=3)
    for ax in axes[len(shared):]:
        ax.set_axis_off()
    skipped = [m for m in others if m not in shared]
    note = f" (no shared components: {', '.join(skipped)})" if skipped else ""
    fig.suptitle(f"'{concept}': score against {reference}'s (dashed: y = x){note}", fontsize=9.5)
    return fig


# -- causal tracing maps -------------------------------------------------------------------------------------------
def _map_method(maps: pd.DataFrame, method: str | None) -> tuple[str, str, str]:
    """(method, its label, what its map scores are) of a maps frame: ``method``, or the one method in it."""
    if method is None:
        found = sorted(set(maps["method"]))
        if len(found) > 1:
            raise ValueError(f"the maps hold several methods {found}: pass method=")
        method = found[0] if found else ""  # no maps: an empty figure

    cls = methods.REGISTRY.get(method)
    return method, (cls.label if cls is not None and cls.label else method), (cls.map_score if cls else "score")


def _trace_rows(maps, concept, method, part, axis):
    return maps[(maps["method"] == method) & (maps["concept"] == concept) & (maps["model_part"] == part)
                & (maps["axis"] == axis)]


def _trace_grid(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    # Several traced modules in one layer (attn1, attn2, ff) get a row each; units of a module are averaged.
    extra = "kind" if rows.groupby("layer", observed=True)["kind"].nunique().max() > 1 else None
    order = _layer_index(rows, extra)
    keys = ["model_part", "layer"] + ([extra] if extra else [])
    grid = rows.pivot_table(index=keys, columns="position", values="score", aggfunc="mean", observed=True)
    grid = grid.reindex(pd.MultiIndex.from_frame(order[keys]))
    grid = grid.astype(float).set_axis(order["label"].to_numpy(), axis=0)
    grid.columns = [int(c) for c in grid.columns]
    return grid, order


def trace_map_unet(maps: pd.DataFrame, concept: str, method: str | None = None) -> Figure:
    """A method's map in the UNet (causal tracing: the restored fraction) per layer x timestep, in denoising order.
    ``maps``: the method's map frame (``Method.maps``, or a comparison's ``maps.parquet``); ``method`` the one to
    draw (default: the only one in it)."""
    method, name, what = _map_method(maps, method)
    rows = _trace_rows(maps, concept, method, "unet", "timestep")
    if rows.empty:
        return _empty(f"no UNet tracing rows with a timestep for concept {concept!r}")
    grid, order = _trace_grid(rows)
    grid = grid[sorted(grid.columns, reverse=True)]  # sampling runs from high (noisy) to low timesteps
    fig = Figure(figsize=(max(5.0, 0.45 * grid.shape[1] + 3), _height(len(order))), layout="constrained")
    ax = fig.add_subplot()
    sns.heatmap(grid, ax=ax, cmap="viridis", cbar_kws={"label": what}, yticklabels=True)
    ax.tick_params(axis="y", labelrotation=0)
    ax.set_xlabel("timestep (denoising order: noisy \u2192 clean)")
    ax.set_ylabel("layer")
    ax.set_title(f"{name}, UNet, concept '{concept}'")
    return fig


def trace_map_text(maps: pd.DataFrame, concept: str, tokens: list[str] | None = None,
                   method: str | None = None) -> Figure:
    """A method's map in the text encoder (causal tracing: the restored fraction) per layer x token position.

    Columns are token offsets relative to the last subject token. ``tokens`` (optional) labels them: a list
    indexed by offset + its first offset is not supported; pass labels for offsets 0, 1, ... only when they align.
    """
    method, name, what = _map_method(maps, method)
    rows = _trace_rows(maps, concept, method, "text_encoder", "token")
    if rows.empty:
        return _empty(f"no text-encoder tracing rows with a token for concept {concept!r}")
    grid, order = _trace_grid(rows)
    grid = grid[sorted(grid.columns)]
    fig = Figure(figsize=(max(5.0, 0.55 * grid.shape[1] + 3), _height(len(order))), layout="constrained")
    ax = fig.add_subplot()
    sns.heatmap(grid, ax=ax, cmap="viridis", cbar_kws={"label": what}, yticklabels=True)
    ax.tick_params(axis="y", labelrotation=0)
    if tokens is not None:
        ax.set_xticks(np.arange(grid.shape[1]) + 0.5)
        ax.set_xticklabels([tokens[p] if 0 <= p < len(tokens) else str(p) for p in grid.columns], rotation=45,
                           ha="right")
    ax.set_xlabel("token offset from the last subject token (0 = that token)")
    ax.set_ylabel("layer")
    ax.set_title(f"{name}, text encoder, concept '{concept}'")
    return fig


def trace_maps(maps: pd.DataFrame, concepts, part: str = "unet", method: str | None = None) -> Figure:
    """A method's maps for several concepts side by side on one colour scale (causal tracing: the restored fraction)
    per layer x timestep (``part="unet"``, noisy to clean) or per layer x token offset (``part="text_encoder"``)."""
    method, name, what = _map_method(maps, method)
    axis = "timestep" if part == "unet" else "token"
    grids = {}
    for c in concepts:
        rows = _trace_rows(maps, c, method, part, axis)
        if not rows.empty:
            g, _ = _trace_grid(rows)
            grids[c] = g[sorted(g.columns, reverse=axis == "timestep")]
    if not grids:
        return _empty(f"no {part} tracing rows with a {axis}")
    values = np.concatenate([g.to_numpy(float).ravel() for g in grids.values()])
    vmin, vmax = float(np.nanmin(values)), float(np.nanmax(values))
    n_rows = max(len(g) for g in grids.values())
    n_cols = max(g.shape[1] for g in grids.values())
    label_w = 0.075 * max(len(str(x)) for g in grids.values() for x in g.index) + 0.6
    fig = Figure(figsize=(label_w + len(grids) * (0.3 * n_cols + 0.5) + 1.0, 0.15 * n_rows + 1.6),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(grids), sharey=True, squeeze=False)).ravel()
    for j, (ax, (c, g)) in enumerate(zip(axes, grids.items())):
        sns.heatmap(g, ax=ax, cmap="viridis", vmin=vmin, vmax=vmax, cbar=j == len(grids) - 1,
                    cbar_kws={"label": what}, yticklabels=True)
        ax.tick_params(axis="y", labelleft=j == 0)
        ax.set_title(f"'{c}'", fontsize=9)
        ax.set_xlabel("timestep (noisy \u2192 clean)" if axis == "timestep" else "token offset", fontsize=8)
        ax.set_ylabel("layer" if j == 0 else "")
        ax.tick_params(axis="y", labelrotation=0, labelsize=7)
        ax.tick_params(axis="x", labelsize=7)
    where = "UNet layer x timestep" if axis == "timestep" else "text-encoder layer x token offset (0 = last subject token)"
    fig.suptitle(f"{name}, {where}: {what}", fontsize=9.5)
    return fig


# -- accuracy vs cost ----------------------------------------------------------------------------------------------
def _mean_within_range(v) -> float:
    """The mean, kept within [min, max]: the mean of equal values can exceed them by a rounding error (three 0.1s
    average to 0.10000000000000002), and a bar from min to max would then need a negative length."""
    return float(np.clip(np.mean(v), np.min(v), np.max(v)))


def accuracy_vs_cost(table: pd.DataFrame, cost: str = "forward_evals", accuracy: str = "lds_spearman") -> Figure:
    """LDS against cost in forward-pass equivalents (log x), one panel per ablation rate alpha, hue = method.

    ``table`` needs columns ``variant`` (or ``method`` alone, for a table without variants), ``alpha`` and the
    ``accuracy`` and ``cost`` columns; several rows of a variant
    (or, when the table has an ``estimator`` column, of an estimator: e.g. COAR at several mask counts) in a panel
    are joined by a line in order of cost. With several concepts, a point is the mean over concepts (at the
    method's mean cost) and its bar spans the worst to the best concept. Rows without a positive cost are left
    out (a log axis cannot show them).
    """
    t = table.dropna(subset=[cost, accuracy])
    t = t[t[cost] > 0]
    if t.empty:
        return _empty("no rows with both a cost and an accuracy")
    alphas = sorted(t["alpha"].unique())
    key = "variant" if "variant" in t else "method"
    group = "estimator" if "estimator" in t else key  # budget variants of one estimator share a line
    methods = sorted(t[group].unique())
    palette = dict(zip(methods, sns.color_palette("tab10" if len(methods) <= 10 else "tab20", len(methods))))
    fig = Figure(figsize=(2.7 * len(alphas) + 2.3, 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(alphas), sharey=True, sharex=True, squeeze=False)).ravel()
    for i, (ax, alpha) in enumerate(zip(axes, alphas)):
        sub = t[t["alpha"] == alpha].astype({group: object})
        # one x per variant, so seaborn aggregates its concepts into one point (costs can differ slightly)
        sub = sub.assign(**{cost: sub.groupby(key)[cost].transform("mean")}).sort_values(cost)
        sns.lineplot(data=sub, x=cost, y=accuracy, hue=group, style=group, palette=palette, hue_order=methods,
                     style_order=methods, markers=True, dashes=False, markersize=8, estimator=_mean_within_range,
                     errorbar=lambda v: (v.min(), v.max()), err_style="bars", sort=True, ax=ax,
                     legend=i == len(alphas) - 1)
        ax.set_xscale("log")
        ax.set_title(f"joint ablation of {alpha:.0%} (\u03b1 = {alpha:g})", fontsize=9.5)
        ax.set_xlabel("forward-pass equivalents (log)", fontsize=8.5)
        ax.set_ylabel(("LDS (Spearman)" if accuracy == "lds_spearman" else accuracy) if i == 0 else "", fontsize=8.5)
        ax.tick_params(labelsize=8)
        ax.grid(True, which="major", color="0.9")
    if axes[-1].get_legend() is not None:
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False, fontsize=8,
                        title=None)
    several = "concept" in t and t["concept"].nunique() > 1
    fig.suptitle("accuracy on held-out joint ablations vs cost"
                 + (" (mean over concepts; bars: worst to best concept)" if several else ""), fontsize=10)
    return fig


# -- export --------------------------------------------------------------------------------------------------------
def fig_to_png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes; the figure is closed afterwards."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    if "matplotlib.pyplot" in sys.modules:  # only a pyplot-made figure is held by pyplot; release it
        sys.modules["matplotlib.pyplot"].close(fig)
    fig.clear()
    return buf.getvalue()


def png_to_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def fig_to_base64_png(fig: Figure, dpi: int = 110) -> str:
    """The figure as a ``data:image/png;base64,...`` URI; the figure is closed afterwards."""
    return png_to_data_uri(fig_to_png(fig, dpi))
