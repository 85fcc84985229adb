"""Screen-then-verify: rank every component with a cheap method, then measure true ablation for the top fraction.

A user gets exact single-ablation effects for the components that matter at a fraction of exhaustive ablation's
cost. The result has one row per component: verified components carry their measured effect (and its standard
error), the others keep the screening method's estimate (no standard error). ``meta["verified"]`` lists which.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from interp.core.components import ComponentSet
from interp.core.engine import single_ablation_deltas
from interp.core.results import Cost, is_main
from interp.methods.base import Capabilities, Method, MethodConfig, Scores, get, option, register, stderr_over


@dataclass(frozen=True)
class ScreenConfig(MethodConfig):
    """Screen-then-verify's options.

    Attributes:
        screen: the registry name of the screening method.
        fraction: share of the components, ranked by the screen, whose true ablation effect is measured, in (0, 1].
        by: rank by ``"abs"`` score, ``"positive"`` or ``"negative"``.
        mode: ``"zero"`` or ``"mean"`` ablation of the verification.
        screen_options: ``((key, value), ...)`` options of the screening method.
    """
    screen: str = "maskgrad"
    fraction: float = option(0.1, "share of components, ranked by the screening method (the mask-averaged "
                                   "gradient), whose true ablation effect is measured, in (0, 1]")
    by: str = "abs"  # rank by |score|, or "positive" / "negative"
    mode: str = "zero"
    screen_options: tuple = ()  # ((key, value), ...) passed to the screening method

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.by not in ("abs", "positive", "negative"):
            raise ValueError(f"by must be 'abs', 'positive' or 'negative', got {self.by!r}")


@register
class ScreenThenVerify(Method):
    """Screen-then-verify: rank with a cheap method, then measure true ablation for the top fraction (see
    the module docstring). The screening method's cost plus one evaluation per verified component.
    """
    name = "screen"
    label = "screen-then-verify"
    default_run = True
    Config = ScreenConfig
    capabilities = Capabilities(granularities=("layer", "neuron", "head", "feature", "tokenkv", "tokenspan"), gradients=True, uses_reference=True,
                                single_changes=True)

    def _scores(self, obj, comps, run):
        cfg = self.config
        # The screening method's result comes from the same store: a run that also reports that method (the
        # default comparison) computes it once.
        screener = get(cfg.screen)(**dict(cfg.screen_options), seed=cfg.seed)
        est = screener.attribute(obj.model, obj.concept, comps, objective=obj, store=run.store, progress=run.progress,
                                 executor=run.executor)
        screened = est.attrs["meta"]
        rows = est[is_main(est)].set_index("component")["score"]  # its main estimate, not its variants
        score = rows.loc[comps.addresses].to_numpy(dtype=np.float64).copy()
        key = {"abs": np.abs(score), "positive": score, "negative": -score}[cfg.by]
        k = max(1, int(round(cfg.fraction * len(comps))))
        top = np.argsort(-key, kind="stable")[:k]
        before = Counter(obj.model.counters)
        delta = single_ablation_deltas(obj, ComponentSet([comps[i] for i in top]), cfg.mode, run.entry, 64,
                                       run.progress, executor=run.executor)
        verified = Counter(obj.model.counters)
        verified.subtract(before)
        verified.update(run.entry.replayed)
        stderr = np.full(len(comps), np.nan)
        score[top] = (-delta.double().mean(1)).numpy()
        stderr[top] = stderr_over(delta.double(), 1).numpy()
        # Cost: the screening method's (as it recorded it, computed now or earlier) plus the verification.
        screened_cost = Cost.from_dict(screened["cost"])
        return Scores(score, stderr,
                      cost=Cost(screened_cost.forward_evals + verified["unet_rows"] / obj.rows_per_eval,
                                screened_cost.backward_evals + verified["unet_rows_grad"] / obj.rows_per_eval),
                      meta={"screen": cfg.screen, "fraction": cfg.fraction, "verified": [comps[i].address for i in top]})

    @classmethod
    def compare_options(cls, cfg, n_components):
        """``--screen-fraction``, screened by the screening method with the options it has in the same comparison
        (the same cached result): the two rows differ only by the verified components."""
        screener = ScreenConfig.screen
        opts = get(screener).compare_options(cfg, n_components)
        return {**super().compare_options(cfg, n_components), "screen": screener,
                "screen_options": tuple((k, v) for k, v in opts.items() if k != "seed")}

    @classmethod
    def reuses(cls, config):
        """The screening method's result, with the options it is run with."""
        return [(config.screen, {**dict(config.screen_options), "seed": config.seed})]

    @classmethod
    def planned_rows(cls, config, comps, shape):
        """UNet rows the result records (see :mod:`interp.studies.plan`): the screening method's recorded cost, then one
        evaluation per verified component."""
        k = max(1, int(round(config.fraction * len(comps))))
        verified = ComponentSet(list(comps)[:k])  # only the count and kinds matter here
        return cls.screener_rows(config, comps, shape)[0] + shape.means(verified, config.mode) + shape.values(k)

    @classmethod
    def screener_rows(cls, config, comps, shape):
        """(recorded, run) rows of the screening method: what its result records, and what computing it runs."""
        screener = get(config.screen)
        sc = screener.Config(**dict(config.screen_options), seed=config.seed)
        return screener.recorded_rows(sc, comps, shape), screener.planned_rows(sc, comps, shape)
