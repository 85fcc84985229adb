"""The HTML report: one self-contained ``index.html`` from summary sentences, sections of tables and figures, and
the run configuration.

Self-contained means it opens from disk with no network: the CSS is inline, figures are embedded as base64 PNG data
URIs (:func:`interp.plots.fig_to_base64_png`) and tables are pandas HTML. Everything else is escaped by Jinja2's
autoescaping. The page is written atomically, so a reader never sees half a report; a run that has not finished
renders with ``complete=False`` and the page says so in a banner.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
from pathlib import Path

import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined

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


def table_html(df: pd.DataFrame) -> str:
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
                      escape=True)


def _section(i: int, s: dict) -> dict:
    unknown = set(s) - {"title", "text", "tables", "figures"}
    if unknown:
        raise ValueError(f"section {s.get('title', i)!r} has unknown keys {sorted(unknown)}")
    figures = []
    for caption, uri in s.get("figures", []):
        # only embedded PNGs: a path or URL would make the page depend on something outside it
        if not str(uri).startswith(_DATA_URI):
            raise ValueError(f"figure {caption!r} of section {s['title']!r} is not a {_DATA_URI}... URI")
        figures.append({"caption": caption, "src": uri})
    paragraphs = [p.strip() for p in str(s.get("text") or "").split("\n\n") if p.strip()]
    return {
        "id": f"section-{i + 1}",
        "title": s["title"],
        "paragraphs": paragraphs,
        "tables": [{"caption": c, "html": table_html(t)} for c, t in s.get("tables", [])],
        "figures": figures,
    }


def render_report(path, *, title: str, summary: list[str], sections: list[dict], config: dict,
                  complete: bool = True) -> Path:
    """Write the report and return the path of its ``index.html``.

    ``path`` is the HTML file if it ends in ``.html``, otherwise a folder that gets ``index.html`` (created if
    needed). A section is ``{"title": str, "text": str (optional; blank lines separate paragraphs),
    "tables": [(caption, DataFrame)], "figures": [(caption, "data:image/png;base64,...")]}``.
    """
    path = Path(path)
    out = path if path.suffix.lower() == ".html" else path / "index.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    html = _environment().get_template("index.html.j2").render(
        title=title,
        summary=list(summary),
        sections=[_section(i, s) for i, s in enumerate(sections)],
        config_json=json.dumps(config, indent=2, sort_keys=True, default=str),
        complete=complete,
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    fd, tmp = tempfile.mkstemp(prefix=".index-", suffix=".html.tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(html)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private (0600); a report is for readers
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
