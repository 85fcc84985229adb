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

import torch
from tqdm.auto import tqdm

from ..interventions import compile_plan, weights_ablated
from ..objectives import reference_means
from .base import Capabilities, Method, MethodConfig, register, stderr_over


@dataclass(frozen=True)
class AblationConfig(MethodConfig):
    mode: str = "zero"
    chunk: int = 64  # components per cached chunk

    def __post_init__(self):
        if self.mode not in ("zero", "mean"):
            raise ValueError(f"ablation mode must be 'zero' or 'mean', got {self.mode!r}")


def single_ablation_deltas(obj, comps, mode="zero", entry=None, chunk=64, progress=False) -> torch.Tensor:
    """``J(ablated) - J(intact)`` per component and sample, shape (n, S)."""
    n = len(comps)
    if "weight" in comps.granularities:
        if mode != "zero":
            raise ValueError("scalar weights are only zero-ablated; use mode='zero' for weight components")
        rows = []
        for c in tqdm(comps, desc="ablation", disable=not progress):
            with weights_ablated(obj.model, [c]), torch.no_grad():
                rows.append(obj.values()[0] - obj.intact)
        return torch.stack(rows)
    plan = compile_plan(obj.model, comps)
    means = reference_means(obj, plan) if mode == "mean" else None
    out = []
    for start in tqdm(range(0, n, chunk), desc="ablation", disable=not progress):
        stop = min(start + chunk, n)

        def compute(start=start, stop=stop):
            M = torch.ones(stop - start, n, dtype=obj.model.dtype)
            M[torch.arange(stop - start), torch.arange(start, stop)] = 0
            with torch.no_grad():
                return {"delta": obj.values(plan, M, means) - obj.intact[None]}

        res = compute() if entry is None else entry.chunk(f"ablate-{start:07d}", compute)
        out.append(res["delta"])
    return torch.cat(out)


@register
class Ablation(Method):
    name = "ablation"
    Config = AblationConfig
    capabilities = Capabilities(granularities=("layer", "neuron", "head", "weight"), exact=True)

    def _scores(self, obj, comps, entry, progress):
        delta = single_ablation_deltas(obj, comps, self.config.mode, entry, self.config.chunk, progress)
        return {"score": -delta.double().mean(1), "stderr": stderr_over(delta.double(), 1),
                "meta": {"mode": self.config.mode, "j_intact": float(obj.intact.mean())}}
