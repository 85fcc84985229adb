"""The HTML report: one self-contained ``index.html`` a researcher reads top to bottom -- answers first, evidence on
demand.

Layout: the generated findings (a few sentences with the run's numbers) and the headline figures open the page;
then one section per question with its main tables and figures, and the variants and secondary evidence in
collapsed ``<details>`` blocks; the run configuration as a readable table last, with the raw metadata JSON
collapsed. A table of contents stays in view at the side.

Self-contained means it opens from disk with no network: the CSS and a small table script (sort by a column,
filter rows; ``templates/tables.js``, written for this suite) are inline, figures are embedded as base64 PNG data
URIs (:func:`interp.report.plots.fig_to_base64_png`) and tables are pandas HTML. Everything else is escaped by Jinja2's
autoescaping. The page is written atomically, so a reader never sees half a report; a run that has not finished
renders with ``complete=False`` and the page says so in a banner.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path

import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from interp._lazy import lazy_submodules
from interp.core.store import atomic_write_text

# Modules of this floor reachable as attributes (``interp.report.plots``), imported on first use.
_MODULES = {"evaluation", "findings", "plots", "tables"}

_TEMPLATES = Path(__file__).resolve().parent / "templates"
_DATA_URI = "data:image/png;base64,"


def _environment() -> Environment:
    return Environment(loader=FileSystemLoader(_TEMPLATES), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True)


def _fmt_float(v) -> str:
    """Three decimals; thousands separators for big numbers; scientific notation for tiny ones (effects ~1e-5)."""
    if v is None or math.isnan(v):
        return "\u2014"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if v != 0 and abs(v) < 0.001:
        return f"{v:.2e}"
    return f"{v:.3f}"


def _fmt_count(v) -> str:
    return "\u2014" if v is None or math.isnan(v) else f"{v:,.0f}"


def table_html(df: pd.DataFrame, table_id: str | None = None) -> str:
    """A DataFrame as an HTML table in the report's style (cell text escaped by pandas).

    Float columns whose values are all whole numbers (counts stored as float because of NaN) print as integers.
    """
    formatters = {}
    for col in df.columns:
        if pd.api.types.is_float_dtype(df[col]):
            v = df[col].dropna().to_numpy(float)
            whole = len(v) > 0 and bool(((v == v.round()) & (abs(v) >= 1)).all())
            formatters[col] = _fmt_count if whole else _fmt_float
    return df.to_html(classes=["data"], index=False, border=0, formatters=formatters, na_rep="\u2014",
                      escape=True, table_id=table_id)


_BLOCK_KEYS = {"title", "text", "tables", "figures"}


class _Ids:
    """Unique element ids for tables and collapsible blocks of one page."""

    def __init__(self):
        self.n = {}

    def __call__(self, prefix: str) -> str:
        self.n[prefix] = self.n.get(prefix, 0) + 1
        return f"{prefix}-{self.n[prefix]}"


def _figures(items, where: str) -> list[dict]:
    out = []
    for caption, uri in items or []:
        # only embedded PNGs: a path or URL would make the page depend on something outside it
        if not str(uri).startswith(_DATA_URI):
            raise ValueError(f"figure {caption!r} of {where} is not a {_DATA_URI}... URI; embed it with "
                             f"interp.report.plots.fig_to_base64_png")
        out.append({"caption": caption, "src": uri})
    return out


def _block(s: dict, where: str, ids: _Ids, extra_keys=()) -> dict:
    unknown = set(s) - _BLOCK_KEYS - set(extra_keys)
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)}; allowed: {sorted(_BLOCK_KEYS | set(extra_keys))}")
    tables = []
    for caption, df in s.get("tables", []):
        tid = ids("table")
        tables.append({"caption": caption, "id": tid, "rows": len(df), "html": table_html(df, table_id=tid)})
    return {
        "title": s.get("title", ""),
        "paragraphs": [p.strip() for p in str(s.get("text") or "").split("\n\n") if p.strip()],
        "tables": tables,
        "figures": _figures(s.get("figures"), where),
    }


def _section(i: int, s: dict, ids: _Ids) -> dict:
    where = f"section {s.get('title', i)!r}"
    out = _block(s, where, ids, extra_keys=("details",))
    out["id"] = f"section-{i + 1}"
    out["details"] = []
    for j, d in enumerate(s.get("details", [])):
        if not d.get("title"):
            raise ValueError(f"collapsible block {j} of {where} needs a 'title' (the line a reader clicks)")
        block = _block(d, f"block {d['title']!r} of {where}", ids)
        block["id"] = f"{out['id']}-details-{j + 1}"
        out["details"].append(block)
    return out


def settings_rows(config: dict, skip=(), max_items: int = 12) -> pd.DataFrame:
    """A run's metadata as a readable two-column table (``setting``, ``value``): nested dicts become dotted names,
    lists are joined with commas (longer ones than ``max_items`` are shortened, the JSON keeps them whole), and
    top-level keys in ``skip`` are left out (bulky per-method metadata belongs in the raw JSON)."""
    rows = []

    def text(v) -> str:
        if isinstance(v, (list, tuple)):
            items = [text(x) for x in v]
            more = f", ... ({len(items)} in all)" if len(items) > max_items else ""
            return ", ".join(items[:max_items]) + more
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        return "\u2014" if v is None else str(v)

    def walk(prefix: str, v) -> None:
        if isinstance(v, dict) and v:
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        else:
            rows.append({"setting": prefix, "value": text(v)})

    for k, v in config.items():
        if k not in skip:
            walk(str(k), v)
    return pd.DataFrame(rows, columns=["setting", "value"])


def render_report(path, *, title: str, summary: list[str], sections: list[dict], config: dict,
                  complete: bool = True, headline=(), settings: pd.DataFrame | None = None,
                  settings_text: str = "") -> Path:
    """Write the report and return the path of its ``index.html``.

    ``path`` is the HTML file if it ends in ``.html``, otherwise a folder that gets ``index.html`` (created if
    needed). ``summary`` is the list of finding sentences that opens the page and ``headline`` the figures right
    below it, ``[(caption, "data:image/png;base64,...")]``. A section is ``{"title": str, "text": str (optional;
    blank lines separate paragraphs), "tables": [(caption, DataFrame)], "figures": [(caption, data URI)],
    "details": [block, ...]}`` where each block (a collapsed ``<details>``, for variants and secondary evidence) has
    the same keys but ``details``, and a ``title``. ``config`` is written as raw JSON (collapsed); ``settings`` (a
    DataFrame, e.g. :func:`settings_rows` of a selection) is the readable table above it, default
    ``settings_rows(config)``.
    """
    path = Path(path)
    out = path if path.suffix.lower() == ".html" else path / "index.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    ids = _Ids()
    rendered = [_section(i, s, ids) for i, s in enumerate(sections)]
    if settings is None:
        settings = settings_rows(config)
    settings_block = _block({"text": settings_text, "tables": [("Settings, versions and timings", settings)]
                             if len(settings) else []}, "the run configuration", ids)
    html = _environment().get_template("index.html.j2").render(
        title=title,
        summary=list(summary),
        headline=_figures(headline, "the headline"),
        sections=rendered,
        settings=settings_block,
        config_json=json.dumps(config, indent=2, sort_keys=True, default=str),
        complete=complete,
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        script=(_TEMPLATES / "tables.js").read_text(encoding="utf-8"),
    )
    atomic_write_text(out, html)  # readers see the old page or the whole new one; readable like any file written
    return out


__getattr__, __dir__ = lazy_submodules(__name__, _MODULES)
