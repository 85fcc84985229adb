"""The one result shape of every method: a tidy (long) DataFrame, one row per component (and per timestep or
token position for causal-tracing maps).

Columns (:data:`COLUMNS`): ``method, model, concept, objective, component, model_part, family, block, layer,
depth, kind, unit, granularity, score, stderr, n_samples, seed, timestep, token, config_hash``.
``score`` follows one sign convention for all methods: **positive = the component supports the concept** (ablating it
lowers J). ``timestep`` and ``token`` are missing (``<NA>``) on ordinary rows; causal tracing adds map rows where one
of them is set (use :func:`main_rows` to drop them). Run metadata (config, versions, wall time, forward/backward
passes) rides in ``df.attrs["meta"]`` and in the cache's JSON sidecar.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

COLUMNS = [
    "method", "model", "concept", "objective", "component", "model_part", "family", "block", "layer", "depth",
    "kind", "unit", "granularity", "score", "stderr", "n_samples", "seed", "timestep", "token", "config_hash",
]
DTYPES = {
    "method": "string", "model": "string", "concept": "string", "objective": "string", "component": "string",
    "model_part": "string", "family": "string", "block": "string", "layer": "string", "depth": "int64",
    "kind": "string", "unit": "int64", "granularity": "string", "score": "float64", "stderr": "float64",
    "n_samples": "int64", "seed": "int64", "timestep": "Int64", "token": "Int64", "config_hash": "string",
}


def make_frame(components, score, stderr=None, *, method: str, model: str, concept: str, objective: str,
               n_samples: int, seed: int, config_hash: str, meta: dict | None = None, timestep=None,
               token=None) -> pd.DataFrame:
    """Build a validated result frame for a component set (a ComponentSet or its ``.frame()``)."""
    left = components.frame() if hasattr(components, "frame") else components.reset_index(drop=True)
    n = len(left)
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    if len(score) != n:
        raise ValueError(f"{len(score)} scores for {n} components")
    stderr = np.full(n, np.nan) if stderr is None else np.asarray(stderr, dtype=np.float64).reshape(-1)
    df = left.assign(
        method=method, model=model, concept=concept, objective=objective, score=score, stderr=stderr,
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


def concat(frames) -> pd.DataFrame:
    """Concatenate result frames; metadata is collected per (method, concept) under ``attrs["meta"]``."""
    frames = list(frames)
    out = pd.concat(frames, ignore_index=True).astype(DTYPES)
    out.attrs["meta"] = {f"{f['method'].iat[0]}/{f['concept'].iat[0]}": f.attrs.get("meta", {}) for f in frames if len(f)}
    return out


def main_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Per-component rows only (drops causal-tracing map rows)."""
    return df[df["timestep"].isna() & df["token"].isna()]
