"""The one result shape of every method: a tidy (long) DataFrame, one row per component and estimate.

Columns (:data:`COLUMNS`): ``method, variant, estimator, budget, mask_alpha, model, concept, objective, component,
model_part, family, block, layer, depth, kind, unit, granularity, score, stderr, n_samples, seed, config_hash``.
``score`` follows one sign convention for all methods: **positive = the component supports the concept** (ablating it
lowers J). Run metadata (config, versions, ...) rides in
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

A method that also localizes along an axis of the computation (causal tracing: UNet layer x timestep, text-encoder
layer x token position; capability ``maps``) returns those maps as a frame of their own (:data:`MAP_COLUMNS`, made
by :func:`make_map_frame`): one row per component and ``position`` on an ``axis``, read with ``Method.maps``.
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
    "kind", "unit", "granularity", "score", "stderr", "n_samples", "seed", "config_hash",
]
DTYPES = {
    "method": "string", "variant": "string", "estimator": "string", "budget": "Int64", "mask_alpha": "Float64",
    "model": "string", "concept": "string", "objective": "string", "component": "string",
    "model_part": "string", "family": "string", "block": "string", "layer": "string", "depth": "int64",
    "kind": "string", "unit": "int64", "granularity": "string", "score": "float64", "stderr": "float64",
    "n_samples": "int64", "seed": "int64", "config_hash": "string",
}

#: The axes a map runs along: the evaluation sample's training-schedule timestep (or the denoising step, for an
#: objective that generates images), and the token position relative to the concept's last subject token.
MAP_AXES = ("timestep", "token")
MAP_COLUMNS = [
    "method", "model", "concept", "objective", "component", "model_part", "family", "block", "layer", "depth", "kind",
    "unit", "granularity", "axis", "position", "score", "stderr", "n_samples", "seed", "config_hash",
]
MAP_DTYPES = {**{c: DTYPES[c] for c in MAP_COLUMNS if c in DTYPES}, "axis": "string", "position": "int64"}



@dataclass(frozen=True)
class Cost:
    """What one estimate cost, in passes of its evaluation set through the UNet.

    Counted passes are a property of the configuration: a resumed run, or one on Ray workers, records the same.

    Attributes:
        forward_evals: forward-only passes over the evaluation set.
        backward_evals: forward + backward passes over the evaluation set (each counts as three forward-pass
            equivalents: :attr:`forward_equivalents`).
        seconds: wall time of the run that made the estimate; None for a budget or rate variant, which has no run of
            its own.

    Raises:
        ValueError: a count that is negative, NaN or infinite.
    """

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
        """The fields as a JSON-ready dict (what results' metadata stores under ``cost``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Cost":
        """The :class:`Cost` a :meth:`to_dict` dict describes (unknown keys are ignored).

        Args:
            d: a dict with ``forward_evals`` and optionally ``backward_evals`` and ``seconds``.

        Returns:
            The cost.

        Raises:
            KeyError: ``forward_evals`` is missing.
            ValueError: a count is negative or not finite.
        """
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


#: A digest of the columns and their types, and of the cost record in the metadata: cached results are keyed by it,
#: so a result of an older schema is recomputed instead of loaded.
SCHEMA = hashlib.sha256(json.dumps([DTYPES, MAP_DTYPES, [f.name for f in fields(Cost)]]).encode()).hexdigest()[:12]


def make_frame(components, score, stderr=None, *, method: str, model: str, concept: str, objective: str,
               n_samples: int, seed: int, config_hash: str, meta: dict | None = None, variant: str | None = None, estimator: str | None = None, budget: int | None = None,
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
    )
    df = df[COLUMNS].astype(DTYPES)
    df.attrs["meta"] = dict(meta or {})
    return validate(df)


def make_map_frame(components, score, stderr, *, axis: str, position: int, method: str, model: str, concept: str,
                   objective: str, n_samples: int, seed: int, config_hash: str) -> pd.DataFrame:
    """One column of a map (:data:`MAP_COLUMNS`): a score per component at ``position`` on ``axis``."""
    if axis not in MAP_AXES:
        raise ValueError(f"map axis must be one of {MAP_AXES}, got {axis!r}")
    left = components.frame() if hasattr(components, "frame") else components.reset_index(drop=True)
    n = len(left)
    score = np.asarray(score, dtype=np.float64).reshape(-1)
    if len(score) != n:
        raise ValueError(f"{len(score)} map scores for {n} components")
    df = left.assign(method=method, model=model, concept=concept, objective=objective, axis=axis,
                     position=int(position), score=score,
                     stderr=np.asarray(stderr, dtype=np.float64).reshape(-1), n_samples=n_samples, seed=seed,
                     config_hash=config_hash)
    return df[MAP_COLUMNS].astype(MAP_DTYPES)


def empty_maps() -> pd.DataFrame:
    """A map frame with no rows (a method without maps, or maps turned off)."""
    return pd.DataFrame({c: pd.Series(dtype=MAP_DTYPES[c]) for c in MAP_COLUMNS})


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


def read_results(path) -> pd.DataFrame:
    """A run folder's ``results.parquet``. A folder written before maps were a frame of their own held them as rows
    with ``timestep`` or ``token`` set: those rows and columns are dropped, so its per-component scores read as
    today's."""
    df = pd.read_parquet(path)
    legacy = [c for c in ("timestep", "token") if c in df.columns]
    if legacy:
        df = df[df[legacy].isna().all(axis=1)].drop(columns=legacy).reset_index(drop=True)
    return df


def costs(meta: dict) -> dict[str, Cost]:
    """The costs one method run's metadata records: ``{method's variant name: Cost}`` for its main estimate (key
    ``meta["method"]``) and every budget or rate variant."""
    out = {meta["method"]: Cost.from_dict(meta["cost"])}
    out.update({v: Cost.from_dict(c) for v, c in (meta.get("variant_costs") or {}).items()})
    return out
