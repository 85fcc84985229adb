"""Screen-then-verify: rank every component with a cheap method, then measure true ablation for the top fraction.

A user gets exact single-ablation effects for the components that matter at a fraction of exhaustive ablation's
cost. The result has one row per component: verified components carry their measured effect (and its standard
error), the others keep the screening method's estimate (no standard error). ``meta["verified"]`` lists which.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..components import ComponentSet
from .ablation import single_ablation_deltas
from .base import Capabilities, Method, MethodConfig, get, register, stderr_over


@dataclass(frozen=True)
class ScreenConfig(MethodConfig):
    screen: str = "maskgrad"
    fraction: float = 0.1
    by: str = "abs"  # rank by |score|, or "positive" / "negative"
    mode: str = "zero"
    screen_options: tuple = ()  # ((key, value), ...) passed to the screening method

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.by not in ("abs", "positive", "negative"):
            raise ValueError(f"by must be 'abs', 'positive' or 'negative', got {self.by!r}")


@register
class ScreenThenVerify(Method):
    name = "screen"
    Config = ScreenConfig
    capabilities = Capabilities(granularities=("layer", "neuron", "head"), gradients=True)

    def _scores(self, obj, comps, entry, progress):
        cfg = self.config
        screener = get(cfg.screen)(**dict(cfg.screen_options), seed=cfg.seed)
        est = screener._scores(obj, comps, None, progress)
        score = np.asarray(est["score"], dtype=np.float64).copy()
        key = {"abs": np.abs(score), "positive": score, "negative": -score}[cfg.by]
        k = max(1, int(round(cfg.fraction * len(comps))))
        top = np.argsort(-key, kind="stable")[:k]
        delta = single_ablation_deltas(obj, ComponentSet([comps[i] for i in top]), cfg.mode, entry, 64, progress)
        stderr = np.full(len(comps), np.nan)
        score[top] = (-delta.double().mean(1)).numpy()
        stderr[top] = stderr_over(delta.double(), 1).numpy()
        return {"score": score, "stderr": stderr,
                "meta": {"screen": cfg.screen, "fraction": cfg.fraction, "verified": [comps[i].address for i in top]}}
