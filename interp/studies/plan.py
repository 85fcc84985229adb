"""What a comparison will cost, before it runs: passes counted, one batched pass measured, wall time projected.

:func:`plan_comparison` reads a :class:`~interp.studies.compare.CompareConfig`, counts the UNet rows every method and
every held-out LDS set will run (each method declares its cost with a ``planned_rows`` classmethod, written next to the
loop it describes), measures one batched forward pass and one forward+backward pass on the actual model (time, peak
resident memory, FLOPs), and projects the wall time of every method. Nothing of the comparison itself runs.

Counting follows the engine's own accounting (:meth:`interp.methods.base.Method.attribute`): a "forward evaluation"
is one pass of the whole evaluation set through the UNet (``Objective.rows_per_eval`` rows: images x timesteps x
erase branches), a "backward evaluation" one such pass with gradients; the planned counts equal those a run records
in its metadata (tested on the concept world for every registered method).

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` on a copy of the UNet built on the ``meta``
device (no memory, no compute), with a multiplier at every ablation site so that the backward pass has the graph of
the engine's (gradients with respect to multipliers, frozen weights). On the meta device attention decomposes into
counted matrix products; on a CPU the fused attention kernel is invisible to the counter, so a count taken there is
lower. Time and memory are measured on the real model, after a warm-up pass at the smallest latent size the UNet
accepts (nnsight reads its trace code on the first call); a measured pass shorter than :data:`REPEAT_BELOW` is
timed twice and the faster run kept, since a first pass at a shape also pays one-off costs. The batch of the measured passes is the engine's batch,
capped so that one pass stays near :data:`FLOP_BUDGET`: on a model of Stable Diffusion's size at 64x64 latents
that is one row. The projection is linear in rows at the measured batch; it covers the UNet passes only (text
encoder passes, regression fits, bootstrap intervals, figures and model loading are not included).

Peak memory is the resident-set high-water mark of the process during the pass (Linux ``/proc/self/status``
``VmHWM``, reset through ``/proc/self/clear_refs``; on CUDA ``torch.cuda.max_memory_allocated``): the weights plus
the activations of the measured batch. On CUDA, whose allocator says what tensors hold, the bytes per row above
what was held before the pass are scaled to the engine's batch (:func:`project_memory`), and the plan names the
``--max-batch`` that fits when that batch would not. :func:`preflight` is the run's own check: on an accelerator,
one pass of each kind at the largest batches the run will make (:func:`engine_batches`), before any method.
"""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from interp.core import models
from interp.core.components import is_text_part
from interp.core.diffusion import fresh_scheduler, latent_shape
from interp.core.interventions import TokenRows, compile_plan, run_text, run_unet
from interp.core.objectives import (
    DTYPES,
    REPLAY_BUDGET,
    checkpoints_generation,
    masks_per_grad_pass,
)
from interp.core.prefix import fill_bytes, frontier, meta_call, meta_unet, upstream_share
from interp.core.runs import InsufficientMemoryError, is_out_of_memory
from interp.methods import get
from interp.studies.compare_config import select_components
from interp.studies.erasure import k_grid

#: FLOPs one measured pass may cost (a fraction of a second on an idle 2-core CPU).
FLOP_BUDGET = 5e10

#: A measured pass shorter than this is timed again and the faster time kept: the first pass at a shape also pays
#: one-off costs (the allocator's first touch of its activations, convolution kernels chosen for the shape), which a
#: sweep of many passes does not. A longer pass is timed once (its one-off share is small), an upper bound.
REPEAT_BELOW = 10.0

#: A measured pass shorter than this grows toward the engine's batch, by its measured time: on a GPU a pass at the
#: FLOP budget takes milliseconds at a batch far below the engine's, whose time per row it overstates. A pass that
#: does not fit in the device's memory is halved instead, and the plan says which ``--max-batch`` fits.
GROW_BELOW = 1.0

#: Masks per forward+backward pass of the gradient methods (their default ``batch``): the measured grad batch.
GRAD_MASKS = 4


def _split(n: int, step: int) -> list[int]:
    """``n`` items in groups of ``step`` (the last one smaller): the group sizes."""
    return [step] * (n // step) + ([n % step] if n % step else [])


# -- counting ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rows:
    """UNet rows a piece of work runs: all of them, those run with gradients (forward + backward), and of those the
    ones whose forward runs again in the backward pass (generation gradients, see
    :func:`interp.core.objectives.checkpoints_generation`; not counted by the model's counters, a cost only)."""

    total: int = 0
    grad: int = 0
    recomputed: int = 0

    def __add__(self, other: "Rows") -> "Rows":
        return Rows(self.total + other.total, self.grad + other.grad, self.recomputed + other.recomputed)

    def __mul__(self, k: int) -> "Rows":
        return Rows(self.total * k, self.grad * k, self.recomputed * k)

    __rmul__ = __mul__

    @property
    def nograd(self) -> int:
        return self.total - self.grad


@dataclass(frozen=True)
class EvalShape:
    """The shape of one objective's evaluation set, known without running the model: what each engine call costs in
    UNet rows. Mirrors :class:`interp.core.objectives.Objective` (the test of this module holds the two together)."""

    kind: str
    anchor: str
    n_images: int
    n_samples: int  # S: images x timesteps (denoising objectives) or images (classifier)
    branches: int  # erase with a shared anchor runs both branches through the intervened UNet
    rows_per_eval: int  # Objective.rows_per_eval: the unit of forward_evals / backward_evals
    unet_calls: int  # UNet calls of one generation (the scheduler's timesteps for gen_steps)
    gen_steps: int
    guided: bool  # classifier-free guidance doubles the rows of every generation call
    concept_world: bool
    text_length: int  # tokens per prompt (padded to the tokenizer's context)
    trace_unet_layers: int  # causal tracing's UNet map: transformer blocks and resnets
    trace_text_layers: int  # causal tracing's text-encoder map: encoder layers
    max_batch: int

    @property
    def cfg_factor(self) -> int:
        return 2 if self.guided else 1

    def grad_masks(self, masks: int) -> int:
        """Mask rows per backward pass for a chunk of ``masks`` (``objectives.masks_per_grad_pass``)."""

        return masks_per_grad_pass(masks, self.cfg_factor if self.kind == "classifier" else self.branches,
                                   self.max_batch)

    def generation(self, prompts: int, grad: bool = False) -> Rows:
        """One generation of ``prompts`` images."""
        n = prompts * self.unet_calls * self.cfg_factor
        return Rows(n, n if grad else 0)

    def values(self, masks: int = 1, grad: bool = False, per_pass: int = 1) -> Rows:
        """``Objective.values`` with ``masks`` multiplier rows over the whole evaluation set; with ``grad``, in
        backward passes of ``per_pass`` mask rows (the engine's ``batch``)."""
        if self.kind == "classifier":
            rows = self.generation(masks * self.n_samples, grad)
            if not grad:
                return rows

            chunks = [c for chunk in _split(masks, per_pass) for c in _split(chunk, self.grad_masks(chunk))]
            again = sum(self.generation(c * self.n_samples).total for c in chunks
                        if checkpoints_generation(c * self.cfg_factor, self.unet_calls, self.max_batch))
            return Rows(rows.total, rows.grad, again)
        n = masks * self.n_samples * self.branches
        return Rows(n, n if grad else 0)

    def target_j(self, blocks: int) -> Rows:
        """Causal tracing's J: the target branch only, ``blocks`` row blocks, no gradients."""
        if self.kind == "classifier":
            return self.generation(blocks * self.n_images)
        return Rows(blocks * self.n_samples)

    def clean_states(self) -> Rows:
        """One clean run of the target prompts that saves states (causal tracing)."""
        return self.target_j(1)

    def means(self, comps, mode: str) -> Rows:
        """Reference means for mean-ablation (``interventions.unit_means``): a target-branch pass, and a second one
        to read the inputs of output projections when heads of the UNet are among the components."""
        if mode != "mean":
            return Rows()
        heads = any(not is_text_part(c.model) and c.granularity == "head" for c in comps)
        return Rows(self.n_samples * (2 if heads else 1))

    def setup(self) -> Rows:
        """Building the objective: samples generated (models other than the concept world), the frozen anchor's
        prediction, and J of the intact model."""
        rows = Rows()
        if self.kind != "classifier" and not self.concept_world:
            rows += self.generation(self.n_images)
        if self.kind == "erase" and self.anchor == "frozen":
            rows += Rows(self.n_samples)
        return rows + self.values(1)


def eval_shape(model, ocfg) -> EvalShape:
    """The :class:`EvalShape` of ``ObjectiveConfig`` ``ocfg`` on ``model``, without a forward pass."""

    sched = fresh_scheduler(model.scheduler)
    model.family.set_timesteps(sched, ocfg.gen_steps, "cpu", latent_shape(model, 1))
    calls = len(sched.timesteps)
    g = ocfg.guidance if ocfg.guidance is not None else model.default_guidance
    if ocfg.kind == "classifier":
        S, B = ocfg.n_images, 1
        rows_per_eval = ocfg.n_images * ocfg.gen_steps * (2 if g != 1 else 1)
    else:
        S = ocfg.n_images * len(ocfg.timesteps)
        B = 2 if (ocfg.kind == "erase" and ocfg.anchor == "shared") else 1
        rows_per_eval = S * B
    return EvalShape(
        kind=ocfg.kind, anchor=ocfg.anchor, n_images=ocfg.n_images, n_samples=S, branches=B,
        rows_per_eval=rows_per_eval, unet_calls=calls, gen_steps=ocfg.gen_steps, guided=g != 1 and model.family.cfg,
        concept_world=bool(model.is_concept_world), text_length=sum(e.length for e in model.encoders),
        trace_unet_layers=len(model.components("layer", family=[f for f in ("block", "single_block", "resnet")
                                                                 if f in model.space.families()])),
        trace_text_layers=len(model.components("layer", family="text_layer")), max_batch=ocfg.max_batch,
    )


def planned_rows(method: str, options: dict, comps, shape: EvalShape) -> Rows:
    """The UNet rows ``method`` with ``options`` will run on ``comps``: its class's ``planned_rows``."""

    cls = get(method)
    if not hasattr(cls, "planned_rows"):
        raise NotImplementedError(f"method {method!r} declares no planned cost (a planned_rows classmethod)")
    return cls.planned_rows(cls.Config(**options), comps, shape)


# -- measuring --------------------------------------------------------------------------------------------------------
def _rss_peak_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the VmHWM high-water mark (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rss_peak() -> float | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _min_size(unet) -> int:
    """The smallest latent side the denoiser accepts: one pixel after every downsampling of a UNet; one patch of a
    transformer (two latents for FLUX's 2x2 packing)."""
    if "block_out_channels" in unet.config:
        return 2 ** (len(unet.config.block_out_channels) - 1)
    return max(2, unet.config.get("patch_size", 1))


def replayed_fraction(model, comps) -> float:
    """The mean fraction of a UNet pass's FLOPs that a single ablation of each of ``comps`` replays instead of
    running (:mod:`interp.core.prefix`; text-encoder components replay nothing), counted on the meta-device copy."""

    in_unet = [c for c in comps if not is_text_part(c.model)]
    if not in_unet:
        return 0.0
    replayed = 0.0
    for site in compile_plan(model, in_unet).denoiser:
        front = frontier(model, model.events[(site.event, site.path)])
        replayed += len(set(site.columns.tolist())) * upstream_share(model, front)
    return replayed / len(comps)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def replay_reserve(model, comps, shape: EvalShape) -> int:
    """Bytes an objective's replay cache may hold during a run over ``comps``: the intact outputs of every module
    upstream of a component's unit over the evaluation set, at most the cache's budget (nothing through generation,
    which never replays). The preflight holds as much of the device while it tries the largest passes."""

    in_unet = [c for c in comps if not is_text_part(c.model)]
    if shape.kind == "classifier" or not in_unet:
        return 0
    paths = {p for site in compile_plan(model, in_unet).denoiser
             for p in frontier(model, model.events[(site.event, site.path)])}
    return min(REPLAY_BUDGET, fill_bytes(model, paths, shape.n_samples * shape.branches))


def _meta_flops(model, comps, rows: int = 1) -> tuple[float, float]:
    """FLOPs of a forward pass and of a forward+backward pass (gradients with respect to multipliers at the
    components' sites, weights frozen) for ``rows`` rows, counted on a meta-device copy of the UNet."""

    meta, x, t, ctx0 = meta_unet(model, rows)
    sites = compile_plan(model, comps).denoiser if len(comps) else []
    out = []
    for grad in (False, True):
        mults = []

        def hook(mod, args, output):
            h = output[0] if isinstance(output, tuple) else output
            m = torch.ones(h.shape[0], *([1] * (h.dim() - 1)), device="meta", dtype=h.dtype, requires_grad=grad)
            mults.append(m)
            h = h * m
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handles = [meta.get_submodule(s.path.split(".", 1)[1]).register_forward_hook(hook) for s in sites]
        ctx = ctx0.clone().requires_grad_(grad and not sites)
        try:
            with torch.set_grad_enabled(grad), FlopCounterMode(display=False) as fc:
                eps = meta_call(model, meta, x, t, ctx)[0]
                if grad:
                    eps.float().pow(2).mean().backward()
        finally:
            for h in handles:
                h.remove()
        out.append(float(fc.get_total_flops()))
    return out[0], out[1]


def _meta_grad_bytes(model, comps, rows: int = 1) -> int:
    """Bytes autograd keeps for the backward pass of ``rows`` rows (gradients with respect to multipliers at the
    components' sites), counted on a meta-device copy of the denoiser: what a gradient pass holds besides the
    weights, without running it. Attention runs PyTorch's math kernel on the meta device, which keeps every
    attention matrix: an upper bound where a GPU's flash or memory-efficient kernel keeps none."""

    meta, x, t, ctx = meta_unet(model, rows)
    sites = compile_plan(model, comps).denoiser if len(comps) else []
    saved: dict[int, int] = {}
    weights = {id(p) for p in meta.parameters()}

    def pack(v):  # a tensor saved twice is held once; weights (and views of them) are held anyway
        if isinstance(v, torch.Tensor) and id(v) not in weights and id(getattr(v, "_base", None)) not in weights:
            saved.setdefault(id(v), v.numel() * v.element_size())
        return v

    def hook(mod, args, output):
        h = output[0] if isinstance(output, tuple) else output
        m = torch.ones(h.shape[0], *([1] * (h.dim() - 1)), device="meta", dtype=h.dtype, requires_grad=True)
        h = h * m
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handles = [meta.get_submodule(s.path.split(".", 1)[1]).register_forward_hook(hook) for s in sites]
    ctx = ctx.requires_grad_(not sites)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
            meta_call(model, meta, x, t, ctx)
    finally:
        for h in handles:
            h.remove()
    return sum(saved.values())


def measure_meta(model, comps) -> dict:
    """What the plan can say of a model on the ``meta`` device (a published architecture without its weights):
    FLOPs of a forward and of a forward+backward row, the weights' bytes in the model's dtype and the activation
    bytes a gradient row keeps; no time (nothing runs)."""

    unet_comps = _unet_components(comps)
    f_fwd, f_grad = _meta_flops(model, unet_comps)
    parts = [m for m in (model.unet, *model.text_encoders.values(), model.vae) if m is not None]
    weights = sum(p.numel() * p.element_size() for m in parts for p in m.parameters())
    return {"meta": True, "flops_per_row": f_fwd, "flops_per_grad_row": f_grad, "seconds_per_row": float("nan"),
            "seconds_per_grad_row": float("nan"), "weights_bytes": weights,
            "grad_bytes_per_row": _meta_grad_bytes(model, unet_comps), "dtype": str(model.dtype).replace("torch.", ""),
            "latent": list(latent_shape(model, 1)[1:]), "device": "meta"}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_pass(model, plan, rows: int, grad: bool, size: int | None = None) -> dict:
    """One batched UNet pass through the engine (nnsight, multipliers at every site), timed."""

    dev, dt = model.device, model.dtype
    # CUDA's allocator says what tensors hold: before the pass's inputs exist (weights, caches) and at its peak
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None
    shape = list(latent_shape(model, rows))
    if size is not None:
        shape[-2:] = [size, size]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dev, dt)
    t = torch.full((rows,), 500, device=dev)
    with torch.no_grad():
        ctx = run_text(model, model.tokenize([""], dev))[0].expand(rows, -1, -1)
    n = 0 if plan is None else len(plan.components)
    mult = torch.ones(rows, n, dtype=torch.float32, requires_grad=grad) if n else None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    reset = _rss_peak_reset()
    _sync(dev)
    t0 = time.perf_counter()
    with torch.set_grad_enabled(grad):
        if grad and not n:
            ctx = ctx.detach().requires_grad_(True)  # gradients reach the text states (text-encoder components)
        extra = {"tokens": TokenRows.none(rows)} if n and plan.has_tokens else {}  # token-KV sites: timed as they run
        eps = run_unet(model, x, t, ctx, plan if n else None, mult, **extra)[0]
        if grad:
            loss = eps.float().pow(2).mean()
            torch.autograd.grad(loss, mult if n else ctx)  # gradients with respect to the multipliers, as the engine
    _sync(dev)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else (_rss_peak() if reset else None)
    return {"rows": rows, "seconds": seconds, "peak_bytes": peak, "base_bytes": base}


def _device_bytes(device) -> int | None:
    """The device's memory, where its allocator reports what tensors hold (CUDA); None elsewhere."""
    return torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else None


def project_memory(q: dict, rows: int, device_bytes: float | None) -> dict:
    """What a pass of ``rows`` rows would hold at its peak, from a measured pass ``q`` on an allocator that reports
    its tensors (CUDA): ``base`` (held before the pass: weights, caches) + the measured pass's bytes per row x
    ``rows``, and the most rows per pass that stay within 90% of ``device_bytes``. Empty without a base."""
    if q.get("base_bytes") is None or not q.get("peak_bytes"):
        return {}
    base = float(q["base_bytes"])
    per_row = max(float(q["peak_bytes"]) - base, 0.0) / q["rows"]
    out = {"projected_rows": rows, "projected_bytes": base + per_row * rows, "device_bytes": device_bytes}
    if device_bytes and per_row > 0:
        out["fitting_rows"] = max(1, int((0.9 * device_bytes - base) // per_row))
    return out


def _steady_pass(model, plan, rows: int, grad: bool) -> dict:
    """:func:`_timed_pass`, repeated once when it is shorter than :data:`REPEAT_BELOW`: the faster time (``timed``
    passes), the higher memory peak."""
    first = _timed_pass(model, plan, rows, grad)
    if first["seconds"] >= REPEAT_BELOW:
        return {**first, "timed": 1}
    second = _timed_pass(model, plan, rows, grad)
    peaks = [q["peak_bytes"] for q in (first, second) if q["peak_bytes"] is not None]
    return {**min(first, second, key=lambda q: q["seconds"]), "peak_bytes": max(peaks) if peaks else None, "timed": 2}


def _fitting_pass(model, plan, rows: int, engine_rows: int, grad: bool) -> dict:
    """:func:`_steady_pass` at ``rows``, grown toward ``engine_rows`` while a pass is shorter than :data:`GROW_BELOW`
    and halved while one does not fit in memory; ``oom_rows``: the batch that did not fit (None if all did)."""

    oom = None
    while True:
        try:
            q = _steady_pass(model, plan, rows, grad)
        except RuntimeError as err:
            if rows == 1 or not is_out_of_memory(err):
                raise
            q = None
        if q is None:  # outside the handler: its traceback no longer holds the failed pass's tensors
            gc.collect()
            if model is not None and model.device.type == "cuda":
                torch.cuda.empty_cache()
            oom, rows = rows, rows // 2
            continue
        if oom is not None or rows >= engine_rows or q["seconds"] >= GROW_BELOW:
            return {**q, "oom_rows": oom}
        rows = min(engine_rows, max(2 * rows, int(rows * GROW_BELOW / max(q["seconds"], 1e-6))))


def _unet_components(comps):
    in_unet = [c for c in comps if not is_text_part(c.model)]
    return type(comps)(in_unet) if in_unet else []


def engine_batches(shape: EvalShape, masks: int | None = None) -> tuple[int, int]:
    """The most UNet rows in one forward pass, and whose graph one backward pass holds (of :data:`GRAD_MASKS` masks;
    through generation, every call's rows), that the engine makes on ``shape``'s evaluation set; ``masks``: the
    forward sweeps have at most that many mask rows."""
    per_mask = shape.rows_per_eval if shape.kind != "classifier" else shape.n_samples * shape.cfg_factor
    fit = max(1, shape.max_batch // max(1, shape.n_samples * shape.branches))
    engine_fwd = (fit if masks is None else max(1, min(fit, masks))) * per_mask
    if shape.kind != "classifier" and per_mask > shape.max_batch:  # one mask's set is split into sample groups
        engine_fwd = shape.branches * max(1, shape.max_batch // shape.branches)
    # A gradient pass is split into sample groups of at most max_batch rows (objectives.grad_samples_per_pass); one
    # through generation holds every call's rows, unless its calls are re-run in the backward pass.
    # Mask rows are split too when one sample of each is more than max_batch (objectives.grad_masks_per_pass).
    if shape.kind != "classifier":
        per_sample = shape.grad_masks(GRAD_MASKS) * shape.branches
        engine_grad = per_sample * min(shape.n_samples, max(1, shape.max_batch // per_sample))
    else:
        # the rows whose graph one backward pass holds: every call's, unless each call is re-run in the backward
        per_call = shape.grad_masks(GRAD_MASKS) * shape.cfg_factor
        held = per_call if checkpoints_generation(per_call, shape.unet_calls, shape.max_batch) else per_call * shape.unet_calls
        engine_grad = held * min(shape.n_samples, max(1, shape.max_batch // held))
    return engine_fwd, engine_grad


def preflight(model, comps, shape: EvalShape, grad: bool, masks: int | None = None) -> None:
    """One forward pass, and with ``grad`` one forward+backward pass, at the largest batches a run will make
    (:func:`engine_batches`), before its first method: on an accelerator a batch the device cannot hold then fails
    in seconds, naming the ``--max-batch`` that fits, instead of hours into the run (``max_batch`` is part of every
    cache key, so a run restarted with another one starts over). Raises
    :class:`interp.core.runs.InsufficientMemoryError`; the model's counters are left as they were."""

    unet_comps = _unet_components(comps)
    plan = compile_plan(model, unet_comps) if len(unet_comps) else None
    fwd, bwd = engine_batches(shape, masks)
    saved = dict(model.counters)
    tight = []
    reserve = replay_reserve(model, unet_comps, shape)
    try:  # the replay cache lives beside the forward sweeps' passes: as much is held while they are tried
        held = torch.empty(reserve, dtype=torch.uint8, device=model.device) if reserve else None
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        raise InsufficientMemoryError(
            f"the replay cache of the run's evaluation set ({_size(reserve)}) does not fit on "
            f"{model.device}, checked before any method ran: evaluate fewer --images or --timesteps, or a lower "
            f"--precision") from None
    try:
        for rows, g in ((fwd, False), (bwd, True))[: 2 if grad else 1]:
            q = _fitting_pass(model, plan, rows, rows, g)
            if q["oom_rows"]:
                tight.append(("forward+backward" if g else "forward", rows, q["rows"]))
            held = None  # gradient sweeps do not replay
    finally:
        del held
        model.counters.clear()
        model.counters.update(saved)
    if tight:
        what = ", ".join(f"{kind}: {rows} UNet rows" for kind, rows, _ in tight)
        fits = min(r for _, _, r in tight)
        cache = f", beside the replay cache's {_size(reserve)}" if reserve else ""
        raise InsufficientMemoryError(f"the run's largest passes do not fit on {model.device} ({what}; {fits} rows "
                                      f"fit{cache}), checked before any method ran: run with --max-batch {fits} or a "
                                      f"lower --precision")


def memory_bounded(model) -> bool:
    """Whether the model runs on an accelerator: a fixed memory whose allocator raises a catchable out-of-memory
    error (a CPU pages, or its process is killed, instead), so a run's largest passes are tried first."""
    return model.device.type != "cpu"


def preflight_run(model, comps, objective_config, methods, masks: int, log=None) -> None:
    """A run's :func:`preflight` on an accelerator (:func:`memory_bounded`; nothing on a CPU), before its first
    method: gradients are tried when one of ``methods`` takes them, forward sweeps of up to ``masks`` masks."""
    if not memory_bounded(model):
        return

    t0 = time.perf_counter()
    preflight(model, comps, eval_shape(model, objective_config), any(get(m).capabilities.gradients for m in methods),
              masks=masks)
    if log is not None:
        log(f"the run's largest passes fit on {model.device} ({time.perf_counter() - t0:.1f} s)")


def measure_passes(model, comps, shape: EvalShape, budget: float = FLOP_BUDGET) -> dict:
    """Time, peak memory and FLOPs of one batched forward pass and one forward+backward pass at the engine's batch
    (capped by ``budget`` FLOPs); per-row figures for the projection. The model's counters are left as they were."""

    if model.device.type == "meta":  # a published architecture without weights: counted, not timed
        return measure_meta(model, comps)
    unet_comps = _unet_components(comps)
    f_fwd, f_grad = _meta_flops(model, unet_comps)
    engine_fwd, engine_grad = engine_batches(shape)
    b_fwd = max(1, min(engine_fwd, int(budget // max(f_fwd, 1.0))))
    b_grad = max(1, min(engine_grad, int(budget // max(f_grad, 1.0))))
    plan = compile_plan(model, unet_comps) if len(unet_comps) else None  # text-only sets: a plain UNet pass
    saved = dict(model.counters)
    try:
        small = _min_size(model.unet)
        for grad in (False, True):  # warm-up: nnsight reads its trace source on the first call
            _timed_pass(model, plan, 1, grad, size=small)
        fwd = _fitting_pass(model, plan, b_fwd, engine_fwd, False)
        bwd = _fitting_pass(model, plan, b_grad, engine_grad, True)
    finally:
        model.counters.clear()
        model.counters.update(saved)
    total = _device_bytes(model.device)
    return {
        "forward": {**fwd, "flops": f_fwd * fwd["rows"], "engine_batch": engine_fwd,
                    **project_memory(fwd, engine_fwd, total)},
        "grad": {**bwd, "flops": f_grad * bwd["rows"], "engine_batch": engine_grad,
                 **project_memory(bwd, engine_grad, total)},
        "flops_per_row": f_fwd, "flops_per_grad_row": f_grad,
        "seconds_per_row": fwd["seconds"] / fwd["rows"], "seconds_per_grad_row": bwd["seconds"] / bwd["rows"],
        "threads": torch.get_num_threads(), "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
        "latent": list(latent_shape(model, 1)[1:]),
    }


# -- the plan ---------------------------------------------------------------------------------------------------------
@dataclass
class ComparisonPlan:
    """Counted passes per method, concept and held-out set (``table``), the measured passes (``passes``)."""

    table: pd.DataFrame
    passes: dict | None
    model: str
    n_components: int
    shape: EvalShape
    notes: list[str] = field(default_factory=list)

    def totals(self) -> pd.DataFrame:
        """The table summed over concepts, one row per method (and held-out set), with a total."""
        cols = ["forward_evals", "backward_evals", "unet_rows", "flops", "seconds"]
        t = self.table.groupby("method", sort=False)[cols].sum(min_count=1)  # unmeasured (NaN) stays unmeasured
        t.insert(0, "concepts", self.table.groupby("method", sort=False)["concept"].nunique())
        t.loc["TOTAL"] = [self.table["concept"].nunique(), *self.table[cols].sum(min_count=1).tolist()]
        return t

    def format(self) -> str:
        """The plan as the text ``--plan`` prints: the evaluation set, the measured passes, memory warnings
        with the ``--max-batch`` that fits, and per method the counted rows, FLOPs and projected time.
        """
        s = self.shape
        lines = [f"Plan: {self.model}, {self.n_components} components, evaluation set of {s.rows_per_eval} UNet rows "
                 f"({s.kind} objective, {s.n_samples} samples x {s.branches} branch(es))"]
        p = self.passes
        if p and p.get("meta"):
            rows80 = int((0.9 * 80 * 2**30 - p["weights_bytes"]) // max(p["grad_bytes_per_row"], 1))
            lines.append(
                f"counted on the meta device (no weights loaded, nothing run) at latent {p['latent']} in {p['dtype']}: "
                f"{p['flops_per_row'] / 1e9:,.1f} GFLOP per forward row, {p['flops_per_grad_row'] / 1e9:,.1f} GFLOP "
                f"per forward+backward row; weights {p['weights_bytes'] / 2**30:.1f} GiB; a gradient row keeps at most "
                f"{p['grad_bytes_per_row'] / 2**30:.2f} GiB of activations (every attention matrix counted, as the "
                f"math kernel keeps them), so "
                + (f"an 80 GiB GPU takes at least {rows80} rows per gradient pass (--max-batch)" if rows80 >= 1 else
                   "with that kernel not one gradient row fits an 80 GiB GPU (a flash kernel keeps far less: measure "
                   "it there)")
                + ". Time is not projected: run --plan on the GPU with the weights to measure it.")
        elif p:
            for key, label in (("forward", "forward pass"), ("grad", "forward+backward pass")):
                q = p[key]
                what = "peak allocated" if q.get("base_bytes") is not None else "peak RSS"
                mem = f", {what} {q['peak_bytes'] / 2**30:.2f} GiB" if q.get("peak_bytes") else ""
                lines.append(
                    f"measured {label}: {q['rows']} rows (engine batch {q['engine_batch']}) at latent {p['latent']} in "
                    f"{q['seconds']:.3f} s, {q['flops'] / 1e9:.1f} GFLOP -> {q['flops'] / q['seconds'] / 1e9:.1f} "
                    f"GFLOP/s{mem} ({p['threads']} threads, {p['device']}, {p['dtype']}"
                    + (", faster of 2 runs" if q.get("timed") == 2 else ", one cold run: an upper bound") + ")")
            tight = [p[k] for k in ("forward", "grad") if p[k].get("oom_rows")]
            if tight:
                fits = min(q["rows"] for q in tight)
                lines.append(f"memory: a pass of {max(q['oom_rows'] for q in tight)} rows did not fit on {p['device']}"
                             f"; {fits} rows did, and the projection is at that batch: run with --max-batch {fits}")
            over = [(key, p[key]) for key in ("forward", "grad")
                    if p[key].get("device_bytes") and p[key].get("projected_bytes", 0) > 0.9 * p[key]["device_bytes"]]
            if over:
                said = [f"a {'forward' if key == 'forward' else 'forward+backward'} pass of {q['projected_rows']} rows "
                        + ("would hold " if i == 0 else "") + f"about {q['projected_bytes'] / 2**30:.1f} GiB"
                        + ("" if q["projected_rows"] == q["rows"] else f" (measured at {q['rows']} rows, scaled by rows)")
                        for i, (key, q) in enumerate(over)]
                lines.append(f"memory: at the engine's batch {' and '.join(said)}, more than 90% of {p['device']}'s "
                             f"{over[0][1]['device_bytes'] / 2**30:.1f} GiB: run with --max-batch "
                             f"{min(q['fitting_rows'] for _, q in over)}")
        t = self.totals()
        show = pd.DataFrame({
            "concepts": t["concepts"].astype(int),
            "fwd evals": t["forward_evals"].map(lambda v: f"{v:,.6g}"),
            "bwd evals": t["backward_evals"].map(lambda v: f"{v:,.6g}"),
            "UNet rows": t["unet_rows"].map(lambda v: f"{int(v):,}"),
            "TFLOP": t["flops"].map(lambda v: f"{v / 1e12:,.2f}"),
            "projected": t["seconds"].map(format_duration),
        })
        lines.append("per method, summed over concepts (evals are per concept x concepts):")
        lines.append(show.to_string())
        lines.extend(self.notes)
        return "\n".join(lines)


def format_duration(s: float) -> str:
    """Seconds as the plan prints them (``12.3 s``, ``4.5 min``, ``2.0 h``, ``1.5 d``; ``-`` when not measured)."""
    if s != s:  # NaN: not measured
        return "-"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def plan_comparison(cfg, model=None, measure: bool = True, workers: int | None = None, *,
                    methods: Sequence[str] | None = None, heldout: bool = True, extra=None,
                    passes: dict | None = None) -> ComparisonPlan:
    """The cost plan of :func:`interp.studies.compare.run_comparison` for ``cfg``, before running anything.

    Counts the UNet rows every method and held-out set will run (each method's ``planned_rows``, checked against the
    run's own counts by the tests) and, with ``measure``, times one forward and one forward+backward pass on the model
    to project the wall time and the memory a pass holds. ``python -m analyses.compare_methods --plan`` prints it.

    Args:
        cfg: the comparison's :class:`~interp.studies.compare_config.CompareConfig`.
        model: an already loaded model; None loads ``cfg.model`` on ``cfg.device`` in ``cfg.dtype``.
        measure: time the passes (False: counts only, in a fraction of a second).
        workers: the sweeps run on that many executor workers (Ray); the plan also says what its projection becomes
            if each worker runs passes at the speed measured here.
        methods: the methods whose rows are counted (default ``cfg.methods``).
        heldout: count the held-out LDS sets (``cfg.lds_alphas``); a study that ranks without them says False.
        extra: ``extra(model, comps, shape)`` -> ``[(name, Rows)]``: a study's own passes per concept (the erasure
            curves' generations), counted and projected like the methods'.
        passes: the measured passes of an earlier plan on the same model (``plan.passes``), reused instead of
            measured again (a study of several runs measures once).

    Returns:
        A :class:`ComparisonPlan`; ``plan.format()`` is the text ``--plan`` prints.

    Raises:
        ValueError: the component selection is empty, or the configuration is invalid for the model.
        interp.core.models.ModelLoadError: ``cfg.model`` cannot be loaded.
    """

    if model is None:
        kwargs = {"dtype": DTYPES[cfg.dtype]}
        if getattr(cfg, "device", None):
            kwargs["device"] = cfg.device
        model = models.load_model(cfg.model, **kwargs)  # (replaceable, as a module attribute)
    comps = select_components(model, cfg)
    if not len(comps):
        raise ValueError("the component selection is empty: widen --families/--kinds/--blocks")
    shape = eval_shape(model, cfg.objective_config())
    n = len(comps)
    # (name, rows the result records as its cost, rows this run executes): they differ where a method reuses
    # another's cached result (screen-then-verify screens with the run's own mask-averaged gradient).

    work: list[tuple[str, Rows, Rows]] = [("(evaluation set)", shape.setup(), shape.setup())]
    done: set[tuple[str, str]] = set()
    for method in cfg.methods if methods is None else methods:
        options = cfg.method_options(method, n)
        recorded = planned_rows(method, options, comps, shape)
        run = recorded
        for other, other_options in get(method).reuses(get(method).Config(**options)):
            cls = get(other)
            oc = cls.Config(**other_options)
            rec = cls.recorded_rows(oc, comps, shape)
            run = Rows(run.total - rec.total, run.grad - rec.grad)  # its record counts the reused result's cost
            if (other, repr(sorted(other_options.items()))) not in done:  # not computed by the run yet: runs now
                run = run + cls.planned_rows(oc, comps, shape)
        done.add((method, repr(sorted(options.items()))))
        work.append((method, recorded, run))
    for alpha in cfg.lds_alphas if heldout else ():  # compare.heldout_ablations: zero-ablation masks, same engine
        r = shape.values(cfg.heldout_masks)
        work.append((f"heldout@{alpha:g}", r, r))
    work += [(name, r, r) for name, r in (extra(model, comps, shape) if extra else [])]
    if passes is None and measure:
        passes = measure_passes(model, comps, shape)
    rows = []
    for concept in cfg.concepts:
        for name, rec, r in work:
            fwd = r.nograd + r.recomputed  # a re-run forward costs what a forward does
            flops = (fwd * passes["flops_per_row"] + r.grad * passes["flops_per_grad_row"]) if passes else float("nan")
            secs = (fwd * passes["seconds_per_row"] + r.grad * passes["seconds_per_grad_row"]) if passes else float("nan")
            rows.append({"method": name, "concept": concept, "forward_evals": rec.total / shape.rows_per_eval,
                         "backward_evals": rec.grad / shape.rows_per_eval, "unet_rows": r.total,
                         "unet_rows_grad": r.grad, "flops": flops, "seconds": secs})

    notes = ["'(evaluation set)': building each concept's objective (its J of the intact model, and generated "
             "samples on models other than the concept world); projected time covers UNet passes only."]
    if passes and shape.kind != "classifier" and any(get(m).capabilities.single_changes
                                                     for m in (cfg.methods if methods is None else methods)):
        # (a generation has no fixed upstream to replay: Objective._replayable)
        frac = replayed_fraction(model, comps)
        notes.append(f"single ablations (true ablation, screen-then-verify's verification) and causal tracing's "
                     f"restorations of UNet components replay the UNet upstream of the changed unit instead of "
                     f"running it where that saves FLOPs (a call whose batches would skip less than one intact pass "
                     f"over the evaluation set runs full passes): at most {frac:.0%} of a pass's FLOPs on average for "
                     f"these components, so their projected FLOPs and time, counted as full passes, are upper "
                     f"bounds. Its cache of intact outputs takes up to {_size(replay_reserve(model, comps, shape))} "
                     f"per concept (a call that would cache more than {_size(REPLAY_BUDGET)} runs full passes).")
    again = sum(r.recomputed for _, _, r in work)
    if again:
        notes.append(f"gradients through generation keep one UNet call's activations at a time (more would exceed "
                     f"--max-batch {shape.max_batch} rows): {again:,} of their rows per concept are run again in the "
                     f"backward pass, counted in FLOPs and time.")
    table = pd.DataFrame(rows)
    if passes and workers and workers > 1:
        # Every sweep's items spread over the workers; the evaluation sets and J of the intact model stay on the driver.
        total = float(table["seconds"].sum())
        driver = float(table.loc[table["method"] == "(evaluation set)", "seconds"].sum())
        notes.append(f"on {workers} workers passing at the speed measured here, the sweeps' "
                     f"{format_duration(total - driver)} become about {format_duration((total - driver) / workers)} "
                     f"(+ {format_duration(driver)} on the driver); "
                     f"workers on other hardware (GPUs) run at their own speed, which this plan does not measure.")
    return ComparisonPlan(table, passes, str(cfg.model), n, shape, notes)


def plan_erasure(ccfg, *, methods: Sequence[str], rankings: int, ks, random_rankings: int, random_masks: int,
                 images: int, steps: int, guidance: float | None, model=None, measure: bool = True,
                 passes: dict | None = None) -> ComparisonPlan:
    """The cost plan of an erasure-curves run (``analyses.erasure_curves``): the rankings' methods on the comparison
    config ``ccfg`` (no held-out LDS sets), then per concept the ablation sets it judges, each a generation of
    ``images`` held-out images in ``steps`` steps and J on the held-out samples.

    Args:
        ccfg: the :class:`~interp.studies.compare_config.CompareConfig` the rankings come from.
        methods: the methods computed here (empty: the rankings are read from a finished comparison).
        rankings: how many rankings are ablated (each method's, contrastive ones included).
        ks: the k grid given, or empty for the default (:func:`interp.studies.erasure.k_grid` of the component count).
        random_rankings, random_masks: the baselines' random orders and joint masks.
        images, steps, guidance: the held-out evaluation.
        model, measure, passes: as :func:`plan_comparison` takes them.

    Returns:
        A :class:`ComparisonPlan` whose rows include ``erasure: generations`` and ``erasure: J``, at most (a top-k set
        that repeats an earlier one is read from the cache).
    """
    def extra(model, comps, shape):
        n_k = len(k_grid(len(comps), tuple(ks)))
        sets = 1 + (rankings + random_rankings) * n_k + random_masks  # 1: the unedited model
        gen = eval_shape(model, replace(ccfg.objective_config(), kind="classifier", n_images=images, gen_steps=steps,
                                        guidance=guidance)).generation(images)
        # J on the held-out samples: that objective's evaluation set, then every set at once
        return [("erasure: generations", gen * sets), ("erasure: J", shape.setup() + shape.values(sets))]

    return plan_comparison(ccfg, model, measure, methods=methods, heldout=False, extra=extra, passes=passes)
