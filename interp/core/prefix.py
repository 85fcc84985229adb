"""Prefix replay: an ablation cannot change anything that runs before it, so that part of the UNet is not run again.

A batch of ablations whose earliest ablated unit sits in, say, the second up block has the same conv_in, time
embedding, down path, mid block and first up block outputs as the intact model, row for row. Those outputs are
computed once per evaluation set (one intact pass over its rows) and replayed into every ablated pass: the
modules are skipped with nnsight's ``Envoy.skip`` and the UNet's own ``forward`` — skip connections, time
embedding, every reshape in between — runs on the replayed values, so no architecture is re-implemented here and
any diffusers UNet (Stable Diffusion's included) is handled alike. What is replayed is, for the earliest
intervention event of the batch, the *frontier*: the outermost UNet modules that finish before that event and run
exactly once per pass (a resnet's shared ``nonlinearity`` is called twice and is never replayed; its parent can be).

The same holds for causal tracing's restorations (Basu et al.): a run that restores one clean state in the
corrupted run equals the corrupted run upstream of that state, so the cache is filled from the corrupted context
instead (one context is cached at a time). Rows are grouped by where their intervention starts; a group smaller
than one batch takes in the next ones and starts where its earliest row does, since a batch of a few rows costs
nearly what a full one does.

The saving is the fraction of the UNet's FLOPs upstream of the changed unit: large for units late in the up path,
nothing for units in the first down block or for joint ablations that touch an early unit (random COAR masks), and
nothing for gradients with respect to every unit. A call replays only where that pays (:func:`replay_pays`): the
FLOPs its batches skip, from per-module shares counted once on a meta-device copy (:func:`module_flops`), must
exceed those of the intact pass that fills the cache. That pass is counted even when an earlier call filled the
cache, so the choice depends on the call alone (a resumed run, or a Ray worker, chooses alike). The replayed values are bitwise those of the same pass without
the intervention, so a replayed pass differs from a full one only by the rounding of the batch size it ran at. The intact passes
that fill the replay cache are not counted in the model's pass counters, like :meth:`Objective.warm`'s: counted
cost stays a property of the configuration, on every executor.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from interp.core.diffusion import latent_shape
from interp.core.families import context_rows


def skippable(model) -> list[tuple[str, int, int]]:
    """``(path, in_event, out_event)`` of every UNet module that runs exactly once per pass, in execution order."""
    cached = getattr(model, "_skippable", None)
    if cached is None:
        rows = []
        unbatched = batchless_outputs(model)
        for (kind, path), i in model.events.items():
            if (kind == "in" and path.startswith(model.denoiser_part + ".") and model.calls.get(path) == 1
                    and path not in unbatched):
                rows.append((path, i, model.events[("out", path)]))
        cached = sorted(rows, key=lambda r: r[1])
        model._skippable = cached
    return cached


def frontier(model, event: int) -> tuple[str, ...]:
    """The outermost once-run UNet modules that finish before event index ``event`` (see :attr:`model.events`)."""
    out, end = [], -1
    for path, i, o in skippable(model):
        if o < event and i > end:  # finished before the event, and not inside a module already chosen
            out.append(path)
            end = o
    return tuple(out)


def meta_unet(model, rows: int = 1):
    """A copy of the model's denoiser on the ``meta`` device (no memory, no compute) and inputs of ``rows`` rows:
    ``(denoiser, x, t, context)``, for counting FLOPs; call it through :func:`meta_call`."""

    unet = model.unet
    with torch.device("meta"):
        meta = type(unet).from_config(unet.config)
    torch.nn.Module.to(meta.requires_grad_(False), unet.dtype)  # diffusers' own .to() warns about fp32 modules
    layout = model.layout
    ctx = torch.zeros(rows, context_rows(layout), layout.width, device="meta", dtype=unet.dtype)
    x = torch.zeros(latent_shape(model, rows), device="meta", dtype=unet.dtype)
    t = torch.zeros(rows, device="meta", dtype=torch.long)
    return meta, x, t, ctx


def meta_call(model, meta, x, t, ctx):
    """The meta-device denoiser's output for latents ``x`` and packed context ``ctx``, called as the family does."""
    kw = model.family.denoiser_inputs(model, x, t, ctx, None)
    return meta(**kw, return_dict=False)


def module_flops(model) -> tuple[dict[str, float], float]:
    """FLOPs of one row through every UNet module (by path, ``unet.…``) and through the whole UNet, counted once
    per model with :class:`torch.utils.flop_counter.FlopCounterMode` on a meta-device copy (no memory, no
    compute; matrix products, convolutions and attention, which is where the time goes)."""
    cached = getattr(model, "_module_flops", None)
    if cached is None:
        from torch.utils.flop_counter import FlopCounterMode

        meta, x, t, ctx = meta_unet(model)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            meta_call(model, meta, x, t, ctx)
        counts, root = fc.get_flop_counts(), type(meta).__name__
        per = {model.denoiser_part + name[len(root):]: float(sum(c.values())) for name, c in counts.items()
               if name == root or name.startswith(root + ".")}
        cached = model._module_flops = (per, float(sum(counts["Global"].values())))
    return cached


def _each_output(model, rows: int, see) -> None:
    """``see(path, output)`` for every denoiser module's output in one meta-device pass of ``rows`` rows."""
    meta, x, t, ctx = meta_unet(model, rows)

    def hook(path):
        return lambda module, args, out: see(path, out)

    hooks = [m.register_forward_hook(hook(f"{model.denoiser_part}.{name}")) for name, m in meta.named_modules() if name]
    try:
        with torch.no_grad():
            meta_call(model, meta, x, t, ctx)
    finally:
        for h in hooks:
            h.remove()


def batchless_outputs(model) -> set[str]:
    """Denoiser modules whose output is not batch-first (FLUX's rotary position embedding: one per token, shared by
    every row), which a replay cache could not index by row; found on a two-row meta-device pass."""
    cached = getattr(model, "_batchless", None)
    if cached is None:
        from torch.utils._pytree import tree_leaves

        found: set[str] = set()

        def check(path, out):
            if any(isinstance(v, torch.Tensor) and (v.dim() == 0 or v.shape[0] != 2) for v in tree_leaves(out)):
                found.add(path)

        _each_output(model, 2, check)
        cached = model._batchless = found
    return cached


def module_bytes(model) -> dict[str, int]:
    """Bytes of one row's output of every UNet module (by path, ``unet.…``; tuples whole) in the model's dtype,
    counted once per model on the meta-device copy: what the replay cache holds per evaluation row of a module."""
    cached = getattr(model, "_module_bytes", None)
    if cached is None:
        sizes: dict[str, int] = {}
        _each_output(model, 1, lambda path, out: sizes.__setitem__(path, nbytes(out)))
        cached = model._module_bytes = sizes
    return cached


def fill_bytes(model, paths, rows: int) -> int:
    """Bytes the replay cache holds for the outputs of ``paths`` over ``rows`` evaluation rows."""
    per = module_bytes(model)
    return rows * sum(per.get(p, 0) for p in paths)


def upstream_share(model, paths) -> float:
    """The fraction of a UNet pass's FLOPs spent in the modules ``paths`` (a frontier): what replaying them saves."""
    per, total = module_flops(model)
    return sum(per.get(p, 0.0) for p in paths) / total if total else 0.0


def replay_pays(model, fronts, rows: list[int], fill_rows: int) -> bool:
    """Whether replaying saves FLOPs: batches of ``rows[i]`` UNet rows replaying the frontiers ``fronts[i]`` skip
    more than the intact pass over ``fill_rows`` rows that fills the cache costs.
    Evenly spread single ablations of a big UNet lose otherwise: their one batch starts at its earliest unit."""
    saved = sum(n * upstream_share(model, f) for n, f in zip(rows, fronts))
    return saved > fill_rows


def earliest_active_event(model, plan, mult: torch.Tensor) -> int | None:
    """The first UNet intervention event at which some row's multiplier differs from 1 (None: no row ablates)."""
    for site in plan.denoiser:  # in execution order
        if (mult[:, site.columns] != 1).any():
            return model.events[(site.event, site.path)]
    return None


@torch.no_grad()
def intact_outputs(model, paths, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                   max_rows: int | None = None) -> dict:
    """The outputs (whole, tuples included) of the modules ``paths`` in one intact, uncounted UNet pass; in passes of
    at most ``max_rows`` rows, concatenated, when there are more rows than that."""
    if max_rows is not None and x.shape[0] > max_rows:
        from torch.utils._pytree import tree_flatten, tree_unflatten

        parts = [intact_outputs(model, paths, x[s : s + max_rows], t[s : s + max_rows], context[s : s + max_rows])
                 for s in range(0, x.shape[0], max_rows)]
        out = {}
        for p in paths:
            leaves, spec = zip(*(tree_flatten(part[p]) for part in parts))
            out[p] = tree_unflatten([torch.cat(ls) if isinstance(ls[0], torch.Tensor) else ls[0]
                                     for ls in zip(*leaves)], spec[0])
        return out
    x = x.to(device=model.device, dtype=model.dtype)
    context = context.to(device=model.device, dtype=model.dtype)
    t = torch.as_tensor(t, device=model.device)
    store: dict = {}
    kw = model.family.denoiser_inputs(model, x, t, context, None)
    first = kw.pop(next(iter(kw)))  # the latents go positionally, as in interventions.run_unet
    with model.nn_unet.trace(first, **kw, return_dict=False):
        for p in sorted(paths, key=lambda p: model.events[("out", p)]):  # outputs in the order they appear
            store[p] = model.envoy(p).output.save()
    return store


def nbytes(value) -> int:
    """Bytes held by the tensors of a (nested) module output."""
    from torch.utils._pytree import tree_leaves

    return sum(v.numel() * v.element_size() for v in tree_leaves(value) if isinstance(v, torch.Tensor))


def rows_of(outputs: dict, index: torch.Tensor, repeats: int) -> dict:
    """The cached outputs at batch rows ``index``, the block repeated ``repeats`` times (one block per mask row)."""
    def take(v):
        if not isinstance(v, torch.Tensor):
            return v
        block = v[index.to(v.device)]
        return block.repeat(repeats, *([1] * (v.dim() - 1))) if repeats > 1 else block

    return {p: tree_map(take, v) for p, v in outputs.items()}
