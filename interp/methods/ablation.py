"""True ablation: the measured change of J when one component alone is ablated. The ground truth the other methods
estimate (leave-one-out in COAR's terms).

For each component, J is evaluated with that component zeroed (or set to its mean over the evaluation inputs,
``mode="mean"``) on the same evaluation set; the score is ``J(intact) - J(ablated)`` (positive = the component
supports the concept), with a standard error over evaluation samples. Ablations run batched through the engine:
``masks_per_pass`` one-hot masks share one forward pass. Work is chunked; finished chunks are cached, so an
interrupted run resumes. Ground truth in float64: ``ObjectiveConfig(dtype="float64")``, which the effects of
single units (often 1e-5 of J) deserve. Scalar weights are ablated one at a time in a context that restores them
bitwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from interp.core.engine import single_ablation_deltas
from interp.methods.base import Capabilities, Method, MethodConfig, Scores, register, stderr_over


@dataclass(frozen=True)
class AblationConfig(MethodConfig):
    """True ablation's options.

    Attributes:
        mode: ``"zero"`` (the component's output set to 0) or ``"mean"`` (to its mean over the evaluation inputs).
        chunk: components per cached chunk (a killed run resumes from the last finished one).
    """
    mode: str = "zero"
    chunk: int = 64  # components per cached chunk

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in ("zero", "mean"):
            raise ValueError(f"ablation mode must be 'zero' or 'mean', got {self.mode!r}")


@register
class Ablation(Method):
    """True ablation: ``J(intact) - J(with this component alone ablated)`` for each component, measured
    (see the module docstring). One evaluation of J per component; the ground truth of every comparison.
    """
    name = "ablation"
    default_erasure = True
    label = "true ablation"
    default_run = True
    variants_help = "'ablation' is the sum of single-ablation effects."
    Config = AblationConfig
    capabilities = Capabilities(granularities=("layer", "neuron", "head", "weight", "feature", "tokenkv", "tokenspan"), exact=True, reference=True,
                                single_changes=True)

    def _scores(self, obj, comps, run):
        delta = single_ablation_deltas(obj, comps, self.config.mode, run.entry, self.config.chunk, run.progress,
                                       executor=run.executor)
        return Scores(-delta.double().mean(1), stderr_over(delta.double(), 1),
                      meta={"mode": self.config.mode, "j_intact": float(obj.intact.mean())})

    @classmethod
    def planned_rows(cls, config, comps, shape):
        """UNet rows of a run (see :mod:`interp.studies.plan`): one evaluation of J per component."""
        if "weight" in comps.granularities:
            return shape.values(1) * len(comps)
        return shape.means(comps, config.mode) + shape.values(len(comps))
