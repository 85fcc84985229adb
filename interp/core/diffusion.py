"""The sampling loop shared by the concept-world pipeline and the component engine, for any diffusers scheduler.

Classifier-free guided denoising written once with the UNet call passed in as a function, so the engine can run the
same loop with nnsight interventions inside each UNet call. Works in pixel space (no VAE, the concept world) and in
latent space (Stable Diffusion, with a VAE), with every scheduler a Stable Diffusion pipeline ships or a user swaps
in (DDIM, DDPM, PNDM, LMS, Euler, Euler ancestral, DPM-Solver++, UniPC, Heun, ...): options are passed to
``scheduler.step`` only when its signature takes them, and stochastic schedulers draw their noise from a seeded
generator.

Precision: the loop keeps latents in float32 (float64 for a float64 model) and casts to the UNet's dtype only at the
UNet call, so a bfloat16 or float16 model changes the precision of the forward passes and nothing else. Random
draws are made in float32 on a CPU generator and then cast and moved, so the same seed gives the same noise on every
device and in every precision.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch
import torch.utils.checkpoint

UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype objective values, latents and statistics are kept in: float64 for float64 models, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tokenize(tokenizer, prompts: Sequence[str], device=None, max_length: int | None = None) -> torch.Tensor:
    """Token ids padded to ``max_length`` (default: the tokenizer's full context, as Stable Diffusion does)."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=max_length or tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device) if device is not None else ids


def encode_ids(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """Per-token text states (``last_hidden_state``), the UNet's cross-attention context."""
    return text_encoder(ids)[0]


def latent_shape(model, batch: int) -> tuple[int, ...]:
    """``(batch, channels, height, width)`` of the latents a model denoises (unpacked, for every family: see
    :mod:`interp.core.families`); ``model`` is a loaded model, or a bare UNet."""
    family = getattr(model, "family", None)
    if family is not None:
        return family.latent_shape(model, batch)
    unet = model
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (batch, unet.config.in_channels, *size)


def randn(shape, generator: torch.Generator | None, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Standard normal noise drawn in float32 on the CPU, then cast and moved: the same draw in every precision and
    on every device (CPU ``randn`` gives different numbers for different dtypes)."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def initial_noise(model, batch: int, generator: torch.Generator | None, dtype=torch.float32, device="cpu"):
    return randn(latent_shape(model, batch), generator, dtype, device)


def noise_model(scheduler) -> str:
    """``"flow"`` for flow-matching schedulers (SD3, FLUX: ``FlowMatchEulerDiscreteScheduler`` and its kin), else
    ``"ddpm"`` (the variance-preserving schedule of Stable Diffusion 1.x/2.x/XL and PixArt, any sampler)."""
    return "flow" if type(scheduler).__name__.startswith("FlowMatch") else "ddpm"


def flow_sigma(scheduler, t: torch.Tensor, dtype) -> torch.Tensor:
    """Flow matching's noise level at training timestep ``t``: ``sigma = t / num_train_timesteps`` (the timestep
    the transformer is told is ``1000 sigma``, as in training; SD3's and FLUX's shifts only choose which sigmas a
    sampler visits)."""
    return t.to(dtype) / num_train_timesteps(scheduler)


def training_schedule(scheduler):
    """The model's training noise schedule (a ``DDPMScheduler`` with the same betas and prediction type).

    Forward noising ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` at a training timestep, and the v-prediction target,
    are properties of how the UNet was trained, not of the sampler the pipeline ships: sigma-based samplers (Euler,
    LMS, Heun, DPM-Solver) define ``add_noise`` only on their own inference timesteps. Built once per config.
    """
    return _training_schedule(_config_key(scheduler.config))


def _config_key(config) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in dict(config).items()
                        if not k.startswith("_")))


@functools.lru_cache(maxsize=16)
def _training_schedule(key: tuple):
    from diffusers import DDPMScheduler

    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in key}
    keep = set(inspect.signature(DDPMScheduler.__init__).parameters)
    return DDPMScheduler(**{k: v for k, v in config.items() if k in keep})


def num_train_timesteps(scheduler) -> int:
    return int(scheduler.config.get("num_train_timesteps", 1000))


def prediction_type(scheduler) -> str:
    return scheduler.config.get("prediction_type", "epsilon")


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t`` at training timesteps ``t`` under the model's training schedule (any sampler): ``sqrt(a_t) x0 +
    sqrt(1 - a_t) eps`` (DDPM), or ``(1 - sigma) x0 + sigma eps`` with ``sigma = t / 1000`` (flow matching)."""
    if noise_model(scheduler) == "flow":
        s = flow_sigma(scheduler, t, x0.dtype).to(x0.device).reshape(-1, *([1] * (x0.dim() - 1)))
        return (1 - s) * x0 + s * noise
    return training_schedule(scheduler).add_noise(x0, noise, t.cpu()).to(x0.dtype)


def denoising_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser predicts: the noise (epsilon models, SD 1.x, SDXL, PixArt), the velocity ``sqrt(a_t) eps -
    sqrt(1 - a_t) x0`` (v models, SD 2.x, the world), or flow matching's velocity ``eps - x0`` (SD3, FLUX)."""
    if noise_model(scheduler) == "flow":
        return noise - x0
    kind = prediction_type(scheduler)
    if kind == "v_prediction":
        return training_schedule(scheduler).get_velocity(x0, noise, t.cpu()).to(x0.dtype)
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {kind!r} in the scheduler config; expected epsilon, v_prediction "
                     f"or sample")


def fresh_scheduler(scheduler):
    """A new scheduler of the same class and config: multistep schedulers (PNDM, DPM-Solver, UniPC, Heun) keep
    state between steps, so a loop never reuses the model's own instance."""
    return scheduler.__class__.from_config(scheduler.config)


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def denoise(
    unet_fn: UNetFn,
    scheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    set_timesteps: Callable | None = None,
) -> torch.Tensor:
    """Run the reverse process from ``latents`` (unit-variance noise); ``unet_fn(x, t, context, step) -> eps``.

    With ``guidance_scale != 1`` the conditional and unconditional branches run as one batch (cond rows first),
    exactly as diffusers' pipelines do. ``scheduler`` is used as given (pass :func:`fresh_scheduler`'s copy);
    ``generator`` seeds stochastic schedulers (DDPM, Euler ancestral, SDE solvers) and is ignored by the others; a
    list holds one generator per row of ``latents``, as diffusers' ``randn_tensor`` takes it. ``set_timesteps(scheduler,
    steps, device, shape)`` sets the schedule as the model's pipeline does (FLUX's sigmas and shift; default:
    ``scheduler.set_timesteps(steps)``). Without ``uncond`` (FLUX, whose guidance is an input of the transformer)
    each image is one row.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if set_timesteps is not None:
        set_timesteps(scheduler, num_inference_steps, latents.device, latents.shape)
    else:
        kwargs = {"device": latents.device} if _accepts(scheduler.set_timesteps, "device") else {}
        scheduler.set_timesteps(num_inference_steps, **kwargs)
    step_kwargs = {"return_dict": False}
    if generator is not None and _accepts(scheduler.step, "generator"):
        step_kwargs["generator"] = generator
    acc = accumulation_dtype(latents.dtype)
    latents = latents.to(acc) * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching has none: 1
    guided = uncond is not None and guidance_scale != 1.0
    context = torch.cat([cond, uncond]) if guided else cond
    for step, t in enumerate(scheduler.timesteps):
        x = torch.cat([latents, latents]) if guided else latents
        if hasattr(scheduler, "scale_model_input"):  # flow-matching schedulers have none (nothing to scale)
            x = scheduler.scale_model_input(x, t)
        eps = unet_fn(x, t, context, step).to(acc)
        if guided:
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents, **step_kwargs)[0].to(acc)
        if callback is not None:
            callback(step, t, latents)
    return latents


def encode(images: torch.Tensor, vae) -> torch.Tensor:
    """Images in [-1, 1] to the latents the UNet denoises: the VAE posterior's mean times ``scaling_factor`` (as SD's
    training data are scaled), without gradients; the images themselves for a pixel-space model (``vae`` None)."""
    if vae is None:
        return images
    with torch.no_grad():
        mean = vae.encode(images.to(vae.dtype)).latent_dist.mean
        return (mean - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor


#: UNet rows at Stable Diffusion's 64x64 latents whose activations one image's VAE decoding (to 512x512 pixels)
#: matches, with room for the spread of measuring it (``benchmarks/bench_decode_memory.py``; README, Benchmarks).
DECODE_ROWS_PER_IMAGE = 6


def decode_batch(latent_shape: Sequence[int], max_rows: int) -> int:
    """Images one VAE decoding may take to hold about what a UNet pass of ``max_rows`` rows does: ``max_rows / 6``
    at 64x64 latents, more at smaller ones (a decoder's activations grow with the pixels)."""
    h, w = latent_shape[-2:]
    return max(1, max_rows * 64 * 64 // (DECODE_ROWS_PER_IMAGE * h * w))


def decode(latents: torch.Tensor, vae=None, checkpoint: bool = False, max_rows: int | None = None) -> torch.Tensor:
    """Latents to images in [0, 1] (float32): through the VAE if there is one, else the latents are pixels in [-1, 1].

    ``max_rows``: the UNet rows a pass may hold; the images are decoded in slices that hold about as much
    (:func:`decode_batch`). ``checkpoint``: under gradients, decode one image at a time and run its decoder again in
    the backward pass (:func:`torch.utils.checkpoint.checkpoint`), so a gradient holds one image's decoder
    activations at a time (at 512x512 pixels, gigabytes each) instead of every image's."""
    if vae is not None:
        shift = vae.config.get("shift_factor")  # SD3's and FLUX's VAEs shift their latents too
        z = (latents / vae.config.scaling_factor + (shift or 0.0)).to(vae.dtype)
        if checkpoint and torch.is_grad_enabled():
            one = lambda zi: vae.decode(zi, return_dict=False)[0]  # noqa: E731
            latents = torch.cat([torch.utils.checkpoint.checkpoint(one, zi, use_reentrant=False) for zi in z.split(1)])
        else:
            step = len(z) if max_rows is None else decode_batch(z.shape, max_rows)
            parts = [vae.decode(zi, return_dict=False)[0] for zi in z.split(step)]
            latents = parts[0] if len(parts) == 1 else torch.cat(parts)
    return (latents.float() / 2 + 0.5).clamp(0, 1)
