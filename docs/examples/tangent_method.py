"""A method of your own, in one file: the tangent gradient.

The score of a component is ``dJ/dm``, the derivative of the objective J with respect to the component's output
multiplier ``m``, taken where every multiplier is ``at`` (1: the intact model). At ``at = 1`` it is the first-order
estimate of what ablating the component alone does (attribution patching's linearization); the midpoint gradient
takes it at ``1 - alpha/2`` instead. Nothing else in the suite changes for it: the comparison, ``--plan``, the
tables, the figures, the report and the erasure curves read the registry.

    python -m analyses.compare_methods --plugin docs/examples/tangent_method.py --methods ablation tangent cad \
        --tangent-at 0.9 --plan

Its options are the fields of its config; those declared with ``option`` are command-line flags
(``--tangent-at``), and every one is part of the cache key of its results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp.core.engine import multiplier_gradients
from interp.methods import Capabilities, Method, MethodConfig, Scores, option, register


@dataclass(frozen=True)
class TangentConfig(MethodConfig):
    """The tangent gradient's options.

    Attributes:
        at: the multiplier every component has where the gradient is taken (1: the intact model).
        mode: ``"zero"`` or ``"mean"`` ablation (what a multiplier of 0 means).
    """

    at: float = option(1.0, "the multiplier every component has where dJ/dm is taken (1: the intact model)")
    mode: str = "zero"

    def __post_init__(self):
        super().__post_init__()  # the base checks the seed and the mode
        if not 0 <= self.at <= 1:
            raise ValueError(f"at must be in [0, 1], got {self.at}")


@register
class Tangent(Method):
    """The tangent gradient: ``dJ/dm`` at multipliers ``at`` (see the module docstring). One forward and one
    backward pass over the evaluation set."""

    name = "tangent"
    label = "the tangent gradient"
    Config = TangentConfig
    capabilities = Capabilities(granularities=("layer", "neuron", "head"), gradients=True)

    def _scores(self, obj, comps, run):
        cfg = self.config
        M = torch.full((1, len(comps)), cfg.at, dtype=torch.float64)
        # the engine's sweep: batched, cached in ``entry`` (a killed run resumes), on the run's executor
        G = multiplier_gradients(obj, comps, M, cfg.mode, 1, run.progress, "tangent", run.entry, run.executor)
        # score > 0 when ablating the component lowers J: J(m = 1) - J(m = 0) ~ dJ/dm
        return Scores(G[0], meta={"at": cfg.at})

    @classmethod
    def planned_rows(cls, config, comps, shape):
        """UNet rows of a run (what ``--plan`` counts): the ablation means, then one forward and backward pass."""
        return shape.means(comps, config.mode) + shape.values(1, grad=True)
