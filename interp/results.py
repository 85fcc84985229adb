"""The one result shape of every method: a tidy (long) DataFrame, one row per component (and per timestep or
token position for causal-tracing maps).

Columns (:data:`COLUMNS`): ``method, variant, estimator, budget, mask_alpha, model, concept, objective, component,
model_part, family, block, layer, depth, kind, unit, granularity, score, stderr, n_samples, seed, timestep, token,
config_hash``.
``score`` follows one sign convention for all methods: **positive = the component supports the concept** (ablating it
lowers J). ``timestep`` and ``token`` are missing (``<NA>``) on ordinary rows; causal tracing adds map rows where one
of them is set (use :func:`main_rows` to drop them). Run metadata (config, versions, ...) rides in
``df.attrs["meta"]`` and in the cache's JSON sidecar; what the estimate cost is a typed :class:`Cost` there
(``meta["cost"]``, and ``meta["variant_costs"]`` for the budget and rate variants; read with :func:`costs`).

One method run can give several estimates: besides its main one, a budget or rate variant (COAR fitted on its
first m masks, the mask-averaged gradient at another ablation rate or from its first K masks). The estimate is
typed by columns, never by parsing a name:

- ``method``: the registered method that produced the row;
- ``variant``: the estimate's display name, unique within a run; equal to ``method`` for the main estimate
  (:func:`is_main`), otherwise written by the method from the fields below (e.g. ``coar@179``,
  ``maskgrad@0.2-K4``); tables have one row per variant;
- ``estimator``: the estimates that differ only by budget share one (one line in the accuracy-vs-cost figure);
- ``budget``: random masks the estimate is computed from, and ``mask_alpha``: their ablation rate (``<NA>`` for
  methods without random masks).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import pandas as pd

COLUMNS = [
    "method", "variant", "estimator", "budget", "mask_alpha", "model", "concept", "objective", "component",
    "model_part", "family", "block", "layer", "depth",
    "kind", "unit", "granularity", "score", "stderr", "n_samples", "seed", "timestep", "token", "config_hash",
]
DTYPES = {
    "method": "string", "variant": "string", "estimator": "string", "budget": "Int64", "mask_alpha": "Float64",
    "model": "string", "concept": "string", "objective": "string", "component": "string",
    "model_part": "string", "family": "string", "block": "string", "layer": "string", "depth": "int64",
    "kind": "string", "unit": "int64", "granularity": "string", "score": "float64", "stderr": "float64",
    "n_samples": "int64", "seed": "int64", "timestep": "Int64", "token": "Int64", "config_hash": "string",
}



@dataclass(frozen=True)
class Cost:
    """What one estimate cost: passes of its evaluation set through the UNet, forward only (``forward_evals``) and
    forward + backward (``backward_evals``), and the wall time of the run that made it (``seconds``; None for a
    budget or rate variant, which has no run of its own). Counted passes are a property of the configuration: a
    resumed run, or one on Ray workers, records the same."""

    forward_evals: float
    backward_evals: float = 0.0
    seconds: float | None = None

    def __post_init__(self):
        for name in ("forward_evals", "backward_evals"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"Cost.{name} must be a finite number >= 0, got {v!r}")

    @property
    def forward_equivalents(self) -> float:
        """Forward-pass equivalents: a backward pass counts as two forward passes."""
        return self.forward_evals + 2 * self.backward_evals

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Cost":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


#: A digest of the columns and their types, and of the cost record in the metadata: cached results are keyed by it,
#: so a result of an older schema is recomputed instead of loaded.
SCHEMA = hashlib.sha256(json.dumps([DTYPES, [f.name for f in fields(Cost)]]).encode()).hexdigest()[:12]


def make_frame(components, score, stderr=None, *, method: str, model: str, concept: str, objective: str,
               n_samples: int, seed: int, config_hash: str, meta: dict | None = None, timestep=None,
               token=None, variant: str | None = None, estimator: str | None = None, budget: int | None = None,
               mask_alpha: float | None = None) -> pd.DataFrame:
    """Build a validated result frame for a component set (a ComponentSet or its ``.frame()``). ``variant`` and
    ``estimator`` default to ``method`` (the main estimate)."""
    left = components.frame() if hasattr(components, "frame") else components.reset_index(drop=True)
    n = len(left)
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    if len(score) != n:
        raise ValueError(f"{len(score)} scores for {n} components")
    stderr = np.full(n, np.nan) if stderr is None else np.asarray(stderr, dtype=np.float64).reshape(-1)
    df = left.assign(
        method=method, variant=variant or method, estimator=estimator or variant or method,
        budget=pd.array([pd.NA if budget is None else int(budget)] * n, dtype="Int64"),
        mask_alpha=pd.array([pd.NA if mask_alpha is None else float(mask_alpha)] * n, dtype="Float64"),
        model=model, concept=concept, objective=objective, score=score, stderr=stderr,
        n_samples=n_samples, seed=seed, config_hash=config_hash,
        timestep=pd.array([pd.NA] * n if timestep is None else np.broadcast_to(timestep, n), dtype="Int64"),
        token=pd.array([pd.NA] * n if token is None else np.broadcast_to(token, n), dtype="Int64"),
    )
    df = df[COLUMNS].astype(DTYPES)
    df.attrs["meta"] = dict(meta or {})
    return validate(df)


def validate(df: pd.DataFrame) -> pd.DataFrame:
    """Check a frame has the tidy schema (columns and dtypes) and finite scores."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"result frame lacks columns {missing}")
    for col, dt in DTYPES.items():
        if str(df[col].dtype) != dt and not (dt == "string" and str(df[col].dtype).startswith("string")):
            raise TypeError(f"column {col!r} has dtype {df[col].dtype}, expected {dt}")
    if not np.isfinite(df["score"].to_numpy()).all():
        raise ValueError("result frame has non-finite scores")
    return df


def is_main(df: pd.DataFrame) -> pd.Series:
    """Rows (of a result frame or a table with ``method`` and ``variant``) of a method's main estimate."""
    return df["variant"] == df["method"]


def concat(frames) -> pd.DataFrame:
    """Concatenate result frames; metadata is collected per (method, concept) under ``attrs["meta"]``."""
    frames = list(frames)
    out = pd.concat(frames, ignore_index=True).astype(DTYPES)
    out.attrs["meta"] = {meta_key(f["method"].iat[0], f["concept"].iat[0]): f.attrs.get("meta", {})
                         for f in frames if len(f)}
    return out


def meta_key(method: str, concept: str) -> str:
    """The key of one method run's metadata in a concatenated frame's ``attrs["meta"]`` (looked up, never split)."""
    return f"{method}/{concept}"


def main_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Per-component rows only (drops causal-tracing map rows)."""
    return df[df["timestep"].isna() & df["token"].isna()]


def costs(meta: dict) -> dict[str, Cost]:
    """The costs one method run's metadata records: ``{method's variant name: Cost}`` for its main estimate (key
    ``meta["method"]``) and every budget or rate variant."""
    out = {meta["method"]: Cost.from_dict(meta["cost"])}
    out.update({v: Cost.from_dict(c) for v, c in (meta.get("variant_costs") or {}).items()})
    return out
