"""The engine: every sweep a method runs, written once, on the objective's J and the multiplier interventions.

Methods describe *what* to evaluate; the engine evaluates it, batched and cached:

- :func:`random_masks`: i.i.d. Bernoulli(alpha) ablation masks, a pure function of their seed (COAR's masks, the
  mask-averaged gradient's, the held-out LDS sets).
- :func:`sweep`: THE chunked, cached, resumable map over work items. Items are split into chunks, run by an executor
  (this process, or Ray workers: :mod:`interp.core.executors`); each finished chunk is stored in the method's cache
  entry (atomically, with its cost), so a killed run resumes from the chunks it finished and reports the cost of an
  uninterrupted run. Every sweep of the suite goes through it.
- :func:`masked_values`: J under many joint ablations (one mask per row, many rows per forward pass).
- :func:`single_ablation_deltas`: ``J(ablated) - J(intact)`` for each component alone (true ablation).
- :func:`multiplier_gradients`: ``dJ/dm`` at rows of multipliers (CAD's neuron scores at ``m = 1``, the
  mask-averaged gradient, integrated gradients).

Every ablated pass replays the intact UNet upstream of its earliest ablated unit instead of running it
(:mod:`interp.core.prefix`, inside :meth:`Objective.values`): single ablations of late units cost a fraction of a pass.

No method imports another method: they share this module.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from interp.core.components import ComponentSet
from interp.core.executors import LOCAL, Job
from interp.core.interventions import compile_plan, weights_ablated
from interp.core.objectives import mean_gradient, reference_means


def random_masks(n_masks: int, n: int, alpha: float, seed: int) -> torch.Tensor:
    """Bernoulli(alpha) ablation masks, (n_masks, n) bool, 1 = ablated; a pure function of its arguments."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n_masks, n, generator=gen) < alpha


def sweep(entry, obj, job: Job, n_items: int, chunk: int, tag: str, progress: bool = False,
          executor=None) -> list[dict[str, torch.Tensor]]:
    """THE chunked, cached, resumable map: ``job`` over ``range(n_items)`` in chunks of ``chunk`` items, run by
    ``executor`` (default: this process). Each chunk's result is stored in ``entry`` under ``<tag>-<start>`` as it
    arrives, with its cost; chunks already in ``entry`` are read, not recomputed (``entry=None``: nothing is cached).
    Returns the chunks' results in order."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    executor = executor or LOCAL
    spans = [(start, min(start + chunk, n_items)) for start in range(0, n_items, chunk)]
    key = {span: f"{tag}-{span[0]:07d}" for span in spans}
    got = {}
    if entry is not None:
        for span in spans:
            cached = entry.cached_chunk(key[span])
            if cached is not None:
                got[span] = cached
    todo = [span for span in spans if span not in got]
    with tqdm(total=len(spans), initial=len(got), desc=tag, disable=not progress) as bar:
        for span, out, used in executor.map(obj, job, todo):
            if entry is not None:
                entry.put_chunk(key[span], out, used)
            got[span] = out
            bar.update()
    return [got[span] for span in spans]


# -- the engine's jobs: module-level functions of data (see interp.core.executors.Job), so any executor can run them --
def _plan_setup(obj, components: list[str], means=None, **extra) -> dict:
    """Parse the components and compile their intervention plan (no model passes)."""
    comps = ComponentSet([obj.model.space.parse(a) for a in components])
    return {"obj": obj, "plan": compile_plan(obj.model, comps), "n": len(comps), "means": means, **extra}


def _values_run(state, start, stop) -> dict[str, torch.Tensor]:
    obj = state["obj"]
    with torch.no_grad():
        return {"J": obj.values(state["plan"], (~state["masks"][start:stop]).to(obj.dtype), state["means"])}


def _ablate_run(state, start, stop) -> dict[str, torch.Tensor]:
    obj, n = state["obj"], state["n"]
    M = torch.ones(stop - start, n, dtype=obj.dtype)
    M[torch.arange(stop - start), torch.arange(start, stop)] = 0
    with torch.no_grad():
        return {"delta": obj.values(state["plan"], M, state["means"]) - state["intact"][None]}


def _grad_run(state, start, stop) -> dict[str, torch.Tensor]:
    obj = state["obj"]
    m = state["M"][start:stop].clone().to(obj.dtype).requires_grad_(True)
    grad = mean_gradient(obj, [m], masks=len(m), plan=state["plan"], mult=m, means=state["means"])[0]
    return {"grad": grad.detach()}


def masked_values(obj, comps, masks: torch.Tensor, mode="zero", entry=None, chunk=256, progress=False,
                  tag="masks", executor=None, means=None) -> torch.Tensor:
    """J per mask and sample, (n_masks, S), cached chunk by chunk. ``masks``: (n_masks, n) bool, 1 = ablated.
    Mean-ablation (``mode="mean"``) uses the objective's reference means unless ``means`` (per site) are given."""
    if means is None and mode == "mean":
        means = reference_means(obj, compile_plan(obj.model, comps))
    job = Job("interp.core.engine:_plan_setup", "interp.core.engine:_values_run",
              {"components": comps.addresses, "means": means, "masks": masks})
    return torch.cat([r["J"] for r in sweep(entry, obj, job, len(masks), chunk, tag, progress, executor)])


def single_ablation_deltas(obj, comps: ComponentSet, mode="zero", entry=None, chunk=64,
                           progress=False, executor=None) -> torch.Tensor:
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
    means = reference_means(obj, compile_plan(obj.model, comps)) if mode == "mean" else None
    job = Job("interp.core.engine:_plan_setup", "interp.core.engine:_ablate_run",
              {"components": comps.addresses, "means": means, "intact": obj.intact})
    return torch.cat([r["delta"] for r in sweep(entry, obj, job, n, chunk, "ablate", progress, executor)])


def multiplier_gradients(obj, comps, M: torch.Tensor, mode="zero", batch=4, progress=False,
                         desc="grad", entry=None, executor=None) -> torch.Tensor:
    """``dJ/dm`` at every row of multipliers ``M`` (K, n), J = mean over the evaluation set; returns (K, n) float64.
    Rows are independent, so one backward pass gives every row's gradient; ``batch`` rows per pass."""
    means = reference_means(obj, compile_plan(obj.model, comps)) if mode == "mean" else None
    job = Job("interp.core.engine:_plan_setup", "interp.core.engine:_grad_run",
              {"components": comps.addresses, "means": means, "M": M})
    return torch.cat([r["grad"] for r in sweep(entry, obj, job, len(M), batch, desc, progress, executor)]).double()
