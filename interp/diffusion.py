"""The sampling loop shared by the concept-world pipeline and the component engine.

Classifier-free guided denoising with any diffusers scheduler, written once with the UNet call passed in as a
function, so the engine can run the same loop with nnsight interventions inside each UNet call. Works in pixel
space (no VAE, the concept world) and in latent space (Stable Diffusion, with a VAE).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def tokenize(tokenizer, prompts: Sequence[str], device=None) -> torch.Tensor:
    """Token ids padded to the tokenizer's full context, as Stable Diffusion does."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device) if device is not None else ids


def encode_ids(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """Per-token text states (``last_hidden_state``), the UNet's cross-attention context."""
    return text_encoder(ids)[0]


def latent_shape(unet, batch: int) -> tuple[int, ...]:
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (batch, unet.config.in_channels, *size)


def initial_noise(unet, batch: int, generator: torch.Generator | None, dtype=torch.float32, device="cpu"):
    return torch.randn(latent_shape(unet, batch), generator=generator, dtype=dtype).to(device)


def denoise(
    unet_fn: UNetFn,
    scheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the reverse process from ``latents``; ``unet_fn(x, t, context, step) -> eps``.

    With ``guidance_scale != 1`` the conditional and unconditional branches run as one batch (cond rows first),
    exactly as diffusers' pipelines do.
    """
    scheduler.set_timesteps(num_inference_steps)
    latents = latents * scheduler.init_noise_sigma
    guided = uncond is not None and guidance_scale != 1.0
    context = torch.cat([cond, uncond]) if guided else cond
    for step, t in enumerate(scheduler.timesteps):
        x = torch.cat([latents, latents]) if guided else latents
        x = scheduler.scale_model_input(x, t)
        eps = unet_fn(x, t, context, step)
        if guided:
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents, generator=generator, return_dict=False)[0]
        if callback is not None:
            callback(step, t, latents)
    return latents


def decode(latents: torch.Tensor, vae=None) -> torch.Tensor:
    """Latents to images in [0, 1]: through the VAE if there is one, else the latents are pixels in [-1, 1]."""
    if vae is not None:
        latents = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return (latents / 2 + 0.5).clamp(0, 1)
