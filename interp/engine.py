"""The engine: every sweep a method runs, written once, on the objective's J and the multiplier interventions.

Methods describe *what* to evaluate; the engine evaluates it, batched and cached:

- :func:`random_masks`: i.i.d. Bernoulli(alpha) ablation masks, a pure function of their seed (COAR's masks, the
  mask-averaged gradient's, the held-out LDS sets).
- :func:`sweep`: THE chunked, cached, resumable map over work items. Items are split into chunks; each finished
  chunk is stored in the method's cache entry (atomically, with its cost), so a killed run resumes from the chunks
  it finished and reports the cost of an uninterrupted run. Every sweep of the suite goes through it.
- :func:`masked_values`: J under many joint ablations (one mask per row, many rows per forward pass).
- :func:`single_ablation_deltas`: ``J(ablated) - J(intact)`` for each component alone (true ablation).
- :func:`multiplier_gradients`: ``dJ/dm`` at rows of multipliers (CAD's neuron scores at ``m = 1``, the
  mask-averaged gradient, integrated gradients).

No method imports another method: they share this module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .components import ComponentSet
from .interventions import compile_plan, weights_ablated
from .objectives import reference_means


def random_masks(n_masks: int, n: int, alpha: float, seed: int) -> torch.Tensor:
    """Bernoulli(alpha) ablation masks, (n_masks, n) bool, 1 = ablated; a pure function of its arguments."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n_masks, n, generator=gen) < alpha


def sweep(entry, n_items: int, chunk: int, compute: Callable[[int, int], dict[str, torch.Tensor]], tag: str,
          progress: bool = False) -> list[dict[str, torch.Tensor]]:
    """Run ``compute(start, stop)`` over ``range(n_items)`` in chunks of ``chunk``; each chunk's result is cached
    in ``entry`` under ``<tag>-<start>`` (``entry=None``: nothing is cached). Returns the chunks' results in order."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    out = []
    for start in tqdm(range(0, n_items, chunk), desc=tag, disable=not progress):
        stop = min(start + chunk, n_items)

        def run(start=start, stop=stop):
            return compute(start, stop)

        out.append(run() if entry is None else entry.chunk(f"{tag}-{start:07d}", run))
    return out


def masked_values(obj, comps, masks: torch.Tensor, mode="zero", entry=None, chunk=256, progress=False,
                  tag="masks", plan=None) -> torch.Tensor:
    """J per mask and sample, (n_masks, S), cached chunk by chunk. ``masks``: (n_masks, n) bool, 1 = ablated."""
    plan = plan or compile_plan(obj.model, comps)
    means = reference_means(obj, plan) if mode == "mean" else None

    def compute(start, stop):
        with torch.no_grad():
            return {"J": obj.values(plan, (~masks[start:stop]).to(obj.dtype), means)}

    return torch.cat([r["J"] for r in sweep(entry, len(masks), chunk, compute, tag, progress)])


def single_ablation_deltas(obj, comps: ComponentSet, mode="zero", entry=None, chunk=64,
                           progress=False) -> torch.Tensor:
    """``J(ablated) - J(intact)`` per component and sample, shape (n, S): one one-hot mask per component, batched.
    Scalar weights are ablated one at a time in a context that restores them bitwise."""
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

    def compute(start, stop):
        M = torch.ones(stop - start, n, dtype=obj.dtype)
        M[torch.arange(stop - start), torch.arange(start, stop)] = 0
        with torch.no_grad():
            return {"delta": obj.values(plan, M, means) - obj.intact[None]}

    return torch.cat([r["delta"] for r in sweep(entry, n, chunk, compute, "ablate", progress)])


def multiplier_gradients(obj, comps, M: torch.Tensor, mode="zero", batch=4, progress=False,
                         desc="grad") -> torch.Tensor:
    """``dJ/dm`` at every row of multipliers ``M`` (K, n), J = mean over the evaluation set; returns (K, n) float64.
    Rows are independent, so one backward pass gives every row's gradient."""
    plan = compile_plan(obj.model, comps)
    means = reference_means(obj, plan) if mode == "mean" else None
    out = []
    for s in tqdm(range(0, len(M), batch), desc=desc, disable=not progress):
        m = M[s : s + batch].clone().to(obj.dtype).requires_grad_(True)
        J = obj.values(plan, m, means).mean(1).sum()
        out.append(torch.autograd.grad(J, m)[0].detach())
    return torch.cat(out).double()
