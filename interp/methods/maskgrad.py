"""Beyond first order: gradients with respect to component multipliers, averaged where the ablations happen.

CAD's score is the gradient at the intact model: a first-order Taylor estimate that fails exactly where edits
operate, when many components are ablated together (saturation, interactions). Give every component a multiplier
``m`` on its output (1 = intact, 0 = ablated; with mean-ablation, 0 = its mean). Then:

``maskgrad`` (mask-averaged gradient)
    the average of ``dJ/dm`` over ``K`` random masks drawn like COAR's (each component ablated with probability
    ``alpha``), with a standard error over masks. The predicted effect of ablating a set ``A`` is
    ``-sum_{c in A} score_c``: the linearization of J around the typical ``alpha``-ablated model rather than around
    the intact one. K masks cost K forward+backward passes (batched), against COAR's thousands of forward passes.
    Defaults K = 12, alpha = 0.05 were chosen from a K sweep on the shipped concept world (the README's "Beyond
    first order" section has the measurements and the command that made them).
``ig`` (integrated gradients along the ablation path)
    all multipliers move together from 1 to ``path_end`` (default 0) in ``K`` steps; the score is the average
    gradient at the step midpoints, times the path length. By the completeness axiom the scores sum to
    ``J(1) - J(path_end)`` as K grows (Sundararajan et al. 2017; the anchors' "beyond first order" section).
``midpoint``
    one gradient at multipliers ``1 - alpha/2`` (the expected multiplier of a half-ablated path): the cheapest step
    beyond CAD.

Sign convention as everywhere: score = the average ``dJ/dm``, positive when removing the component lowers J. (At
``m = 1`` this is exactly CAD's aggregated score; on an objective linear in the multipliers all variants equal CAD.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp.core.engine import multiplier_gradients, random_masks
from interp.core.results import Cost
from interp.methods.base import Capabilities, Estimate, Method, MethodConfig, Scores, option, register, stderr_over


@dataclass(frozen=True)
class MaskGradConfig(MethodConfig):
    """The mask-averaged gradient's options.

    Attributes:
        n_masks: random masks K; the score averages ``dJ/dm`` over them.
        alpha: the masks' ablation rate, in (0, 1): the point the estimate linearizes around.
        mode: ``"zero"`` or ``"mean"`` ablation.
        batch: masks per forward+backward pass.
        extra_alphas: also estimate at these rates (rows of variant ``maskgrad@<alpha>``, each costing as much again).
        curve: also report the estimate from the first K masks, for each K (free; variant ``maskgrad@<alpha>-K<K>``).
    """
    n_masks: int = option(12, "random masks K of the mask-averaged gradient (12 was chosen by a sweep of K: "
                              "docs/results.md)", flag="masks")
    alpha: float = option(0.05, "ablation rate of the mask-averaged gradient (and of the midpoint gradient unless "
                                "--midpoint-alpha is given), in (0, 1)")
    mode: str = "zero"
    batch: int = 4  # masks per forward+backward pass
    extra_alphas: tuple[float, ...] = ()  # also estimate at these ablation rates; rows of variant "maskgrad@<alpha>"
    #: Also report the estimate from the first K masks, for each K here (free: the same masks' running average),
    #: as rows of variant "maskgrad@<alpha>-K<K>": the accuracy-vs-cost curve of this method.
    curve: tuple[int, ...] = option((), "also report the mask-averaged gradient from its first K masks, for each K "
                                        "(free)", compare=(4, 8))

    def __post_init__(self):
        super().__post_init__()
        if any(not 1 <= k < self.n_masks for k in self.curve):
            raise ValueError(f"curve mask counts must be in [1, n_masks={self.n_masks}), got {self.curve}")
        if any(not 0 < a < 1 for a in self.extra_alphas):
            raise ValueError(f"extra_alphas must be in (0, 1), got {self.extra_alphas}")
        if not 0 < self.alpha < 1 or self.n_masks < 1:
            raise ValueError(f"need 0 < alpha < 1 and n_masks >= 1, got alpha={self.alpha}, n_masks={self.n_masks}")


@dataclass(frozen=True)
class IGConfig(MethodConfig):
    """Integrated gradients' options.

    Attributes:
        steps: steps K along the path.
        path_end: where every multiplier ends (0: all ablated).
        mode: ``"zero"`` or ``"mean"`` ablation.
        batch: steps per forward+backward pass.
    """
    steps: int = option(16, "steps K of integrated gradients along the ablation path")
    path_end: float = 0.0
    mode: str = "zero"
    batch: int = 4


@dataclass(frozen=True)
class MidpointConfig(MethodConfig):
    """The midpoint gradient's options.

    Attributes:
        alpha: the gradient is taken at multipliers ``1 - alpha/2``.
        mode: ``"zero"`` or ``"mean"`` ablation.
    """
    alpha: float = option(0.05, "the midpoint gradient is taken at multipliers 1 - alpha/2, in (0, 1) (default in "
                                "a comparison: --maskgrad-alpha)")
    mode: str = "zero"


@register
class MaskGrad(Method):
    """The mask-averaged gradient: ``dJ/dm`` averaged over K random alpha-ablation masks (see the module
    docstring). K forward and K backward passes per ablation rate.
    """
    name = "maskgrad"
    default_erasure = True
    label = "the mask-averaged gradient"
    default_run = True
    variants_help = ("'maskgrad@a' averages gradients over masks drawn at ablation rate a, '-K4' over its first 4 "
                     "masks.")
    Config = MaskGradConfig
    capabilities = Capabilities(granularities=("layer", "neuron", "head", "feature", "tokenkv", "tokenspan"), gradients=True)

    def _scores(self, obj, comps, run):
        cfg = self.config
        out = {}
        for alpha in (cfg.alpha, *cfg.extra_alphas):
            Z = random_masks(cfg.n_masks, len(comps), alpha, cfg.seed + 777)
            out[alpha] = multiplier_gradients(obj, comps, (~Z).double(), cfg.mode, cfg.batch, run.progress,
                                              f"maskgrad-a{alpha:g}", run.entry, run.executor)
        G = out[cfg.alpha]
        extra = [Estimate(out[a].mean(0), stderr_over(out[a], 0), self.estimate(a)) for a in cfg.extra_alphas]
        per = float(cfg.n_masks)  # each estimate: n_masks forward + n_masks backward passes over the evaluation set
        costs = {self.estimate(a)["variant"]: Cost(per, per) for a in cfg.extra_alphas}
        for a in (cfg.alpha, *cfg.extra_alphas):
            for k in sorted(cfg.curve):  # the masks are i.i.d., so the first k of them are a K = k estimate
                extra.append(Estimate(out[a][:k].mean(0), stderr_over(out[a][:k], 0), self.estimate(a, k)))
                costs[self.estimate(a, k)["variant"]] = Cost(float(k), float(k))
        return Scores(G.mean(0), stderr_over(G, 0), {"budget": cfg.n_masks, "mask_alpha": cfg.alpha}, variants=extra,
                      # the cost of this estimate alone; the run also paid for the extra alphas' estimates
                      cost=Cost(per, per), variant_costs=costs,
                      meta={"alpha": cfg.alpha, "n_masks": cfg.n_masks,
                            "forward_evals_all_alphas": per * (1 + len(cfg.extra_alphas))})

    def estimate(self, alpha: float, k: int | None = None) -> dict:
        """The typed columns of the estimate at ablation rate ``alpha`` from the first ``k`` masks (all when None),
        and its name: estimates at one rate form one estimator, whose budget is the number of masks."""
        cfg = self.config
        return {"variant": f"maskgrad@{alpha:g}" + (f"-K{k}" if k is not None else ""),
                "estimator": "maskgrad" if alpha == cfg.alpha else f"maskgrad@{alpha:g}",
                "budget": cfg.n_masks if k is None else k, "mask_alpha": alpha}

    @classmethod
    def compare_options(cls, cfg, n_components):
        """``--maskgrad-masks`` masks at ``--maskgrad-alpha``, also at the comparison's other LDS rates (variants:
        the rate being predicted is the linearization point that matters), and the budget curve below K (its
        comparison default, (4, 8), keeps the points below ``--maskgrad-masks``)."""
        opts = super().compare_options(cfg, n_components)
        k, alpha = opts.get("n_masks", MaskGradConfig.n_masks), opts.get("alpha", MaskGradConfig.alpha)
        if "curve" not in cfg.options.get(cls.name, {}):
            opts["curve"] = tuple(c for c in opts["curve"] if c < k)
        return {**opts, "extra_alphas": tuple(a for a in cfg.lds_alphas if a != alpha)}

    @classmethod
    def planned_rows(cls, config, comps, shape):
        """UNet rows of a run (see :mod:`interp.studies.plan`): K masks, forward and backward, at every ablation
        rate."""
        return cls.recorded_rows(config, comps, shape) * (1 + len(config.extra_alphas))

    @classmethod
    def recorded_rows(cls, config, comps, shape):
        """The cost the result records as its own: one rate's K masks (the extra rates are separate estimates)."""
        return shape.means(comps, config.mode) + shape.values(config.n_masks, grad=True, per_pass=config.batch)


@register
class IntegratedGradients(Method):
    """Integrated gradients along the ablation path: every multiplier from 1 to ``path_end`` in K steps
    (see the module docstring). One forward and one backward pass per step.
    """
    name = "ig"
    label = "integrated gradients"
    default_run = True
    Config = IGConfig
    capabilities = Capabilities(granularities=("layer", "neuron", "head", "feature", "tokenkv", "tokenspan"), gradients=True)

    def _scores(self, obj, comps, run):
        cfg = self.config
        s = (torch.arange(cfg.steps, dtype=torch.float64) + 0.5) / cfg.steps
        levels = 1 - s * (1 - cfg.path_end)
        M = levels[:, None].expand(-1, len(comps))
        G = multiplier_gradients(obj, comps, M, cfg.mode, cfg.batch, run.progress, "ig", run.entry, run.executor)
        G = G * (1 - cfg.path_end)
        return Scores(G.mean(0), stderr_over(G, 0), meta={"steps": cfg.steps, "path_end": cfg.path_end})

    @classmethod
    def planned_rows(cls, config, comps, shape):
        """UNet rows of a run (see :mod:`interp.studies.plan`): one forward and backward pass per step."""
        return shape.means(comps, config.mode) + shape.values(config.steps, grad=True, per_pass=config.batch)


@register
class Midpoint(Method):
    """The midpoint gradient: one ``dJ/dm`` at multipliers ``1 - alpha/2`` (see the module docstring). One
    forward and one backward pass.
    """
    name = "midpoint"
    label = "the midpoint gradient"
    default_run = True
    Config = MidpointConfig
    capabilities = Capabilities(granularities=("layer", "neuron", "head", "feature", "tokenkv", "tokenspan"), gradients=True)

    def _scores(self, obj, comps, run):
        cfg = self.config
        M = torch.full((1, len(comps)), 1 - cfg.alpha / 2, dtype=torch.float64)
        G = multiplier_gradients(obj, comps, M, cfg.mode, 1, run.progress, "midpoint", run.entry, run.executor)
        return Scores(G[0], meta={"alpha": cfg.alpha})

    @classmethod
    def compare_options(cls, cfg, n_components):
        """``--midpoint-alpha``, else the mask-averaged gradient's rate (``--maskgrad-alpha``): the midpoint is its
        one-step counterpart."""
        opts = super().compare_options(cfg, n_components)
        if "alpha" not in opts and "alpha" in cfg.options.get(MaskGrad.name, {}):
            opts["alpha"] = cfg.options[MaskGrad.name]["alpha"]
        return opts

    @classmethod
    def planned_rows(cls, config, comps, shape):
        """UNet rows of a run (see :mod:`interp.studies.plan`): one forward and backward pass."""
        return shape.means(comps, config.mode) + shape.values(1, grad=True)
