"""Generation under interventions: the shared denoising loop with nnsight ablations and patches in every UNet call."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from interp.core import diffusion
from interp.core.interventions import Patch, Plan, run_text, run_unet
from interp.core.tokens import bind as bind_tokens


def generate(
    model,
    prompts,
    seed: int = 0,
    steps: int = 20,
    guidance: float | None = None,
    plan: Plan | None = None,
    mult: torch.Tensor | None = None,
    means=None,
    context: torch.Tensor | None = None,
    latents: torch.Tensor | None = None,
    unet_patches: Callable[[int], Mapping[str, Patch]] | None = None,
    decode: bool = True,
    record: list[str] | None = None,
    recorded: dict | None = None,
    checkpoint: bool = False,
    max_rows: int | None = None,
    noise_ids=None,
    concept=None,
) -> torch.Tensor:
    """Images in [0, 1] (or final latents with ``decode=False``) for ``prompts`` from seeded noise.

    ``mult`` rows apply per prompt (one row per prompt, or one row for all). ``context`` overrides the encoded
    prompts (causal tracing passes corrupted or restored states). ``unet_patches(step)`` gives patches for a step.
    Runs with gradients if the caller enabled them; ``checkpoint`` then re-runs each UNet call, and each image's VAE
    decoding, in the backward pass instead of keeping their activations, so the memory of a gradient is one call's
    or one image's decoding, not one per step and image. ``max_rows``: the UNet rows a pass may hold (the caller's
    ``max_batch``); the VAE decodes the images in slices that hold about as much (:func:`diffusion.decode_batch`).
    ``noise_ids``: one integer per prompt naming its stream of step noise for stochastic schedulers (DDPM, Euler
    ancestral, ...; :func:`step_generators`): an image gets the same noise under every intervention and in every
    call, whatever else the call holds, so callers that split their images into calls, or run one image under
    many masks, pass each image's index. Default: the prompts' positions in this call. ``concept`` (a word or a
    Concept): the concept whose tokens token-KV components act at (:mod:`interp.core.tokens`), needed when ``plan`` has
    any; prompts that do not name it are left untouched.
    """
    prompts = model.check_prompts(prompts)
    n = len(prompts)
    guidance = model.default_guidance if guidance is None else guidance
    if mult is not None and mult.shape[0] not in (1, n):
        raise ValueError(f"{mult.shape[0]} multiplier rows for {n} prompts")
    if mult is not None and mult.shape[0] == 1:
        mult = mult.expand(n, -1)
    noise_ids = list(range(n)) if noise_ids is None else [int(i) for i in noise_ids]
    if len(noise_ids) != n:
        raise ValueError(f"{len(noise_ids)} noise_ids for {n} prompts")
    # Classifier-free guidance runs an unconditional branch; FLUX's guidance is an input of its transformer instead.
    guided = guidance != 1.0 and model.family.cfg
    if context is None:
        context = run_text(model, model.tokenize(prompts, model.device), plan, mult, means)[0]
    uncond = None
    if guided:
        uncond = model.family.uncond(model, context)  # SDXL's pipeline zeroes the empty prompt's states
        if uncond is None:
            uncond = run_text(model, model.tokenize([""] * n, model.device), plan, mult, means)[0]
    gen = torch.Generator().manual_seed(seed)  # CPU: the same draws on every device
    if latents is None:
        latents = diffusion.initial_noise(model, n, gen, diffusion.accumulation_dtype(model.dtype), model.device)
    scheduler = diffusion.fresh_scheduler(model.scheduler)  # never mutate the model's own
    rows = torch.cat([mult, mult]) if (mult is not None and guided) else mult
    extra = {}
    if plan is not None and plan.has_tokens:  # the prompts' concept tokens; guidance's unconditional rows have none
        if concept is None:
            raise ValueError("token-KV components act at the concept's tokens: pass generate(..., concept=WORD)")
        index = torch.arange(n)
        extra["tokens"] = bind_tokens(model, concept, prompts, strict=False).rows(
            torch.cat([index, torch.full((n,), -1)]) if guided else index)

    def unet_fn(x, t, ctx, step):
        patches = dict(unet_patches(step)) if unet_patches is not None else None
        if patches and guided:  # patches are given for the conditional rows; the unconditional rows keep theirs
            patches = {k: Patch(torch.cat([p.clean, p.clean]), torch.cat([p.where, torch.zeros_like(p.where)]))
                       for k, p in patches.items()}
        eps, saved = run_unet(model, x, t, ctx, plan, rows, means, patches, saves=record or (), checkpoint=checkpoint,
                              guidance=guidance, **extra)
        if record:
            recorded[step] = {k: v[:n] for k, v in saved.items()}
        return eps

    out = diffusion.denoise(unet_fn, scheduler, latents, context, uncond, steps, guidance,
                            generator=step_generators(seed, noise_ids), set_timesteps=model.family.set_timesteps)
    return diffusion.decode(out, model.vae, checkpoint=checkpoint, max_rows=max_rows) if decode else out


def step_generators(seed: int, noise_ids) -> list[torch.Generator]:
    """One CPU generator per image for a stochastic scheduler's step noise (diffusers draws row ``i`` from the
    ``i``-th), seeded by ``seed`` and the image's id apart from the initial noise. Per image, not per call: a
    single generator would give an image the noise of its position in the batch, so two calls that hold it at
    different positions (a mask row beside another, a split into calls within ``max_batch``) would denoise it
    differently, and an ablation's change in J would carry that difference."""
    return [torch.Generator().manual_seed(((seed + 7_919) * 1_000_003 + i) % 2**63) for i in noise_ids]
