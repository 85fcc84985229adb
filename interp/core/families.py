"""Model families: how each diffusers text-to-image pipeline turns prompts into its denoiser's conditioning and calls
its denoiser, written once per family and tested against the pipeline's own output (``tests/test_families.py``).

A family is a table row, chosen by the pipeline's denoiser class (and, for UNets, by whether it takes SDXL's added
text-time conditioning), never by sniffing attributes:

======== ==================================== =========================================== ==================== =========
family   denoiser                             text encoders (in order)                    conditioning         noise
======== ==================================== =========================================== ==================== =========
sd       ``UNet2DConditionModel``             CLIP (``last_hidden_state``)                 states               DDPM
sdxl     ``UNet2DConditionModel`` text_time   CLIP + CLIP-with-projection (penultimate)    states, pooled, ids  DDPM
pixart   ``PixArtTransformer2DModel``         T5 (with its attention mask)                 states, mask, size   DDPM
sd3      ``SD3Transformer2DModel``            CLIP-L + CLIP-G (penultimate, padded) + T5   states, pooled       flow
flux     ``FluxTransformer2DModel``           CLIP (pooled) + T5                           states, pooled       flow
======== ==================================== =========================================== ==================== =========

**The packed context.** Every method in the suite handles "the text conditioning of a batch of prompts" as one
tensor of shape ``(rows, tokens, width)``: it is indexed by image, repeated per mask row, concatenated with the
unconditional branch and patched by causal tracing. A family whose denoiser takes more than per-token states
(SDXL's pooled embedding, PixArt's attention mask) appends those per-row vectors to the token states as extra
rows of the same width (:func:`pack`), and :meth:`Family.denoiser_inputs` splits them off again just before the
denoiser runs. Row operations therefore act on all of a prompt's conditioning at once, and a Stable Diffusion
1.x/2.x context is exactly the text encoder's states, as before. Token ids are packed the same way: the ids of
every tokenizer of the family side by side, ``(rows, sum of lengths)``.

**Latents** are kept unpacked, ``(rows, channels, height, width)``, in every family: FLUX's 2x2 token packing is a
permutation done around the transformer call (:meth:`Flux.denoiser_inputs`, :meth:`Flux.prediction`), so the
noise, the evaluation set and J (a mean over latent elements) do not depend on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Encoder:
    """One text encoder of a family: the pipeline's attribute names and the token length it is run at."""

    part: str  # pipeline attribute of the encoder, e.g. "text_encoder_2"; also its component-address prefix
    tokenizer: str  # pipeline attribute of its tokenizer
    length: int  # tokens per prompt (padded to), as the pipeline tokenizes
    #: keyword arguments the pipeline calls the encoder with (besides the ids)
    hidden_states: bool = False  # the pipeline reads hidden_states[-2] (output_hidden_states=True)
    attention_mask: bool = False  # the pipeline passes the tokenizer's attention mask (PixArt's T5)


@dataclass(frozen=True)
class Layout:
    """Where a family's parts sit in a packed context: ``tokens`` token rows, then the extras' flattened values."""

    tokens: int
    width: int
    extras: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (name, shape without the batch dimension)


def pack(states: torch.Tensor, extras: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Layout]:
    """``states`` (B, L, D) with per-row ``extras`` appended as zero-padded rows of width D; and their layout."""
    B, L, D = states.shape
    layout = Layout(L, D, tuple((k, tuple(v.shape[1:])) for k, v in extras.items()))
    if not extras:
        return states, layout
    flat = torch.cat([v.reshape(B, -1).to(states.dtype) for v in extras.values()], 1)
    rows = -(-flat.shape[1] // D)
    flat = F.pad(flat, (0, rows * D - flat.shape[1]))
    return torch.cat([states, flat.reshape(B, rows, D)], 1), layout


def context_rows(layout: Layout) -> int:
    """Rows of a packed context: the token rows and the rows its extras fill."""
    n = sum(math.prod(shape) for _, shape in layout.extras)
    return layout.tokens + -(-n // layout.width)


def unpack(ctx: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The inverse of :func:`pack`: ``(states, extras)``."""
    states = ctx[:, : layout.tokens]
    if not layout.extras:
        return states, {}
    flat = ctx[:, layout.tokens :].reshape(ctx.shape[0], -1)
    out, at = {}, 0
    for name, shape in layout.extras:
        n = math.prod(shape)
        out[name] = flat[:, at : at + n].reshape(ctx.shape[0], *shape)
        at += n
    return states, out


class Family:
    """How one kind of pipeline conditions and calls its denoiser. Subclasses override what differs."""

    name = "sd"
    label = "Stable Diffusion 1.x/2.x"
    denoiser = "unet"  # pipeline attribute of the denoiser; also its component-address prefix
    #: classifier-free guidance as two batch rows per image (False: FLUX's guidance is an input of the transformer)
    cfg = True
    #: the guidance scale the pipeline's ``__call__`` defaults to
    default_guidance = 7.5
    #: the noise model it was trained with: "ddpm" (epsilon / v / sample targets) or "flow" (flow matching)
    noise = "ddpm"

    # -- text ----------------------------------------------------------------------------------------------
    def encoders(self, pipe) -> list[Encoder]:
        """The text encoders the family's pipeline runs, in order, with the token length it runs each at (``pipe``:
        anything with the pipeline's attributes)."""
        return [Encoder("text_encoder", "tokenizer", pipe.tokenizer.model_max_length)]

    def read(self, enc: Encoder, output) -> tuple[torch.Tensor, ...]:
        """What the family keeps of one encoder's output (the tensors :meth:`assemble` takes)."""
        return (output[0],)

    def assemble(self, model, reads: dict[str, tuple[torch.Tensor, ...]], ids: torch.Tensor):
        """Packed context from every encoder's :meth:`read`; ``(ctx, layout)``."""
        return pack(reads["text_encoder"][0], {})

    def uncond(self, model, ctx: torch.Tensor) -> torch.Tensor | None:
        """The unconditional branch's context when it is not the encoded empty prompt (SDXL's zeros), else None."""
        return None

    # -- the denoiser ----------------------------------------------------------------------------------------
    def latent_shape(self, model, batch: int) -> tuple[int, ...]:
        """``(batch, channels, height, width)`` of the (unpacked) latents the denoiser works on by default."""
        size = model.denoiser.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (batch, model.denoiser.config.in_channels, *size)

    def denoiser_inputs(self, model, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
                        guidance: float | None) -> dict:
        """Keyword arguments of one denoiser call on latents ``x`` at scheduler timesteps ``t`` (one per row)."""
        states, _ = unpack(ctx, model.layout)
        return {"sample": x, "timestep": t, "encoder_hidden_states": states}

    def prediction(self, model, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model's prediction in the latents' layout from the denoiser's first output."""
        return out

    def set_timesteps(self, scheduler, steps: int, device, shape) -> None:
        """``scheduler.set_timesteps`` as the pipeline calls it for latents of ``shape``."""
        import inspect

        kwargs = {"device": device} if "device" in inspect.signature(scheduler.set_timesteps).parameters else {}
        scheduler.set_timesteps(steps, **kwargs)

    def pipeline_kwargs(self, model) -> dict:
        """Arguments that make the pipeline's own ``__call__`` run as the suite does (for the equality tests)."""
        return {}


class SDXL(Family):
    name, label = "sdxl", "Stable Diffusion XL"
    default_guidance = 5.0

    def encoders(self, pipe):
        out = []
        for part, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            if getattr(pipe, part, None) is not None:  # the refiner has only the second
                out.append(Encoder(part, tok, getattr(pipe, tok).model_max_length, hidden_states=True))
        return out

    def read(self, enc, output):
        keep = (output.hidden_states[-2],)
        return keep + ((output[0],) if enc.part == "text_encoder_2" else ())

    def assemble(self, model, reads, ids):
        states = torch.cat([reads[e.part][0] for e in model.encoders], -1)
        pooled = reads["text_encoder_2"][1]
        h, w = (s * model.vae_scale_factor for s in self.latent_shape(model, 1)[2:])
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=states.dtype, device=states.device).expand(len(states), -1)
        return pack(states, {"text_embeds": pooled, "time_ids": time_ids})

    def uncond(self, model, ctx):
        if model.pipeline is not None and model.pipeline.config.get("force_zeros_for_empty_prompt", False):
            # the pipeline zeroes the negative prompt's states and pooled embedding, and keeps the time ids
            states, extra = unpack(ctx, model.layout)
            return pack(torch.zeros_like(states), {"text_embeds": torch.zeros_like(extra["text_embeds"]),
                                                   "time_ids": extra["time_ids"]})[0]
        return None

    def denoiser_inputs(self, model, x, t, ctx, guidance):
        states, extra = unpack(ctx, model.layout)
        return {"sample": x, "timestep": t, "encoder_hidden_states": states,
                "added_cond_kwargs": {"text_embeds": extra["text_embeds"], "time_ids": extra["time_ids"]}}


class PixArt(Family):
    name, label = "pixart", "PixArt-α/Σ"
    denoiser = "transformer"
    default_guidance = 4.5
    #: T5 tokens the pipeline encodes by default (``max_sequence_length``): PixArt-α's 120, PixArt-Σ's 300
    length = 120
    sigma_length = 300

    def encoders(self, pipe):
        sigma = type(pipe).__name__ == "PixArtSigmaPipeline" or getattr(pipe, "pixart_sigma", False)
        n = min(self.sigma_length if sigma else self.length, pipe.tokenizer.model_max_length)
        return [Encoder("text_encoder", "tokenizer", n, attention_mask=True)]

    def read(self, enc, output):
        return (output[0],)

    def assemble(self, model, reads, ids):
        states = reads["text_encoder"][0]
        # T5 pads with a token no prompt contains, so the tokenizer's attention mask is where the ids are not it
        mask = (ids != model.tokenizers["text_encoder"].pad_token_id).to(states.dtype)
        return pack(states, {"mask": mask})

    def denoiser_inputs(self, model, x, t, ctx, guidance):
        states, extra = unpack(ctx, model.layout)
        added = {"resolution": None, "aspect_ratio": None}
        if model.denoiser.use_additional_conditions:
            h, w = (s * model.vae_scale_factor for s in x.shape[2:])
            added = {"resolution": torch.tensor([[h, w]], dtype=states.dtype, device=x.device).expand(len(x), -1),
                     "aspect_ratio": torch.full((len(x), 1), h / w, dtype=states.dtype, device=x.device)}
        return {"hidden_states": x, "encoder_hidden_states": states, "encoder_attention_mask": extra["mask"],
                "timestep": t, "added_cond_kwargs": added}

    def prediction(self, model, out, x):
        # PixArt learns the variance too: the first half of its channels is the noise prediction
        return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * x.shape[1] else out

    def pipeline_kwargs(self, model):
        return {"max_sequence_length": model.encoders[0].length, "clean_caption": False,
                "use_resolution_binning": False}


class SD3(Family):
    name, label = "sd3", "Stable Diffusion 3/3.5"
    denoiser = "transformer"
    default_guidance = 7.0
    noise = "flow"
    length = 256  # the pipeline's default max_sequence_length for T5

    def encoders(self, pipe):
        out = [Encoder("text_encoder", "tokenizer", pipe.tokenizer.model_max_length, hidden_states=True),
               Encoder("text_encoder_2", "tokenizer_2", pipe.tokenizer_2.model_max_length, hidden_states=True)]
        if getattr(pipe, "text_encoder_3", None) is not None:
            out.append(Encoder("text_encoder_3", "tokenizer_3", min(self.length, pipe.tokenizer_3.model_max_length)))
        return out

    def read(self, enc, output):
        if enc.part == "text_encoder_3":
            return (output[0],)
        return (output.hidden_states[-2], output[0])  # penultimate states, projected pooled embedding

    def assemble(self, model, reads, ids):
        clip = torch.cat([reads["text_encoder"][0], reads["text_encoder_2"][0]], -1)
        pooled = torch.cat([reads["text_encoder"][1], reads["text_encoder_2"][1]], -1)
        width = model.denoiser.config.joint_attention_dim
        clip = F.pad(clip, (0, width - clip.shape[-1]))
        if "text_encoder_3" in reads:
            t5 = reads["text_encoder_3"][0]
        else:  # a pipeline loaded without T5 conditions on zeros in its place (max_sequence_length rows), as diffusers does
            t5 = clip.new_zeros(len(clip), self.length, width)
        return pack(torch.cat([clip, t5], -2), {"pooled": pooled})

    def denoiser_inputs(self, model, x, t, ctx, guidance):
        states, extra = unpack(ctx, model.layout)
        return {"hidden_states": x, "timestep": t, "encoder_hidden_states": states,
                "pooled_projections": extra["pooled"]}

    def set_timesteps(self, scheduler, steps, device, shape):
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):  # SD3.5 pipelines with dynamic shifting
            seq = (shape[-2] // 2) * (shape[-1] // 2)
            kwargs["mu"] = _shift_mu(scheduler, seq)
        scheduler.set_timesteps(steps, device=device, **kwargs)

    def pipeline_kwargs(self, model):
        t5 = [e for e in model.encoders if e.part == "text_encoder_3"]
        return {"max_sequence_length": t5[0].length} if t5 else {}


class Flux(Family):
    name, label = "flux", "FLUX.1"
    denoiser = "transformer"
    cfg = False
    default_guidance = 3.5
    noise = "flow"
    length = 512  # the pipeline's default max_sequence_length for T5

    def encoders(self, pipe):
        return [Encoder("text_encoder", "tokenizer", pipe.tokenizer.model_max_length),
                Encoder("text_encoder_2", "tokenizer_2", min(self.length, pipe.tokenizer_2.model_max_length))]

    def read(self, enc, output):
        return (output.pooler_output,) if enc.part == "text_encoder" else (output[0],)

    def assemble(self, model, reads, ids):
        return pack(reads["text_encoder_2"][0], {"pooled": reads["text_encoder"][0]})

    def latent_shape(self, model, batch):
        # FLUX's transformer has no sample size: the pipeline's default image is 1024 px (128 latents); a folder may
        # record another in the transformer's config (the suite's tiny test pipelines do)
        size = model.denoiser.config.get("sample_size", 128)
        return (batch, model.denoiser.config.in_channels // 4, size, size)

    def denoiser_inputs(self, model, x, t, ctx, guidance):
        states, extra = unpack(ctx, model.layout)
        B, C, H, W = x.shape
        packed = x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)
        img_ids = torch.zeros(H // 2, W // 2, 3)
        img_ids[..., 1] += torch.arange(H // 2)[:, None]
        img_ids[..., 2] += torch.arange(W // 2)[None, :]
        kw = {"hidden_states": packed, "timestep": t / 1000, "pooled_projections": extra["pooled"],
              "encoder_hidden_states": states, "txt_ids": torch.zeros(states.shape[1], 3, device=x.device, dtype=x.dtype),
              "img_ids": img_ids.reshape(-1, 3).to(device=x.device, dtype=x.dtype)}
        if model.denoiser.config.guidance_embeds:
            g = model.default_guidance if guidance is None else guidance
            kw["guidance"] = torch.full((B,), float(g), device=x.device, dtype=torch.float32)
        else:
            kw["guidance"] = None
        return kw

    def prediction(self, model, out, x):
        B, C, H, W = x.shape
        return out.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)

    def set_timesteps(self, scheduler, steps, device, shape):
        sigmas = np.linspace(1.0, 1 / steps, steps)
        seq = (shape[-2] // 2) * (shape[-1] // 2)
        kwargs = {"mu": _shift_mu(scheduler, seq)} if scheduler.config.get("use_dynamic_shifting", False) else {}
        scheduler.set_timesteps(sigmas=sigmas, device=device, **kwargs)

    def pipeline_kwargs(self, model):
        return {"max_sequence_length": model.encoders[1].length}


def _shift_mu(scheduler, seq_len: int) -> float:
    """FLUX's resolution-dependent shift (diffusers' ``calculate_shift``): linear in the image's token count."""
    c = scheduler.config
    base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    base, top = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
    m = (top - base) / (max_len - base_len)
    return seq_len * m + (base - m * base_len)


#: The families by the class name of their denoiser (UNets split on SDXL's added conditioning below).
FAMILIES: dict[str, Family] = {f.name: f for f in (Family(), SDXL(), PixArt(), SD3(), Flux())}
_BY_DENOISER = {"PixArtTransformer2DModel": "pixart", "SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


def family_of(pipe) -> Family:
    """The family of a loaded pipeline, from its denoiser's class; a one-line error names an unknown one."""
    den = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if den is None:
        raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer: the suite needs a "
                         f"text-to-image diffusion pipeline")
    cls = type(den).__name__
    if cls == "UNet2DConditionModel":
        return FAMILIES["sdxl" if den.config.get("addition_embed_type") == "text_time" else "sd"]
    if cls in _BY_DENOISER:
        return FAMILIES[_BY_DENOISER[cls]]
    raise ValueError(f"the denoiser {cls} of {type(pipe).__name__} is not a family the suite knows (known: "
                     f"UNet2DConditionModel, {', '.join(sorted(_BY_DENOISER))}); see the docs' page on adding a "
                     f"model family")
