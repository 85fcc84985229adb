"""Learned features as components: sparse autoencoders (SAEs) on a module's output, whose latents every
activation-based method attributes like neurons.

A neuron is a basis direction the model happens to use; a concept is often spread over many of them. A sparse
autoencoder learns an overcomplete dictionary in which each activation vector is a sparse sum of directions
(Bricken et al. 2023, "Towards Monosemanticity"); the top-k variant keeps exactly the ``k`` largest latents of each
row, which fixes the sparsity without an L1 penalty and leaves few dead latents with the AuxK loss (Gao et al. 2024,
"Scaling and evaluating sparse autoencoders"). In diffusion models, SAeUron (Cywiński & Deja, ICML 2025) trains
top-k SAEs on the cross-attention blocks of Stable Diffusion over whole denoising trajectories and unlearns concepts
by ablating features; Surkov et al. (2024) find interpretable, causally effective SAE features in SDXL-Turbo's
transformer blocks. This module brings that unit of analysis into the suite:

1. :func:`collect_activations`: the output of one module (its *site*) over generation trajectories — several
   prompts and seeds, every denoising step, both classifier-free-guidance branches where used — as rows of width
   ``d`` (a token's vector, or a spatial position's channels for a channel-first output), through the suite's own
   nnsight layer.
2. :func:`train_sae`: a short, seeded, resumable training loop around EleutherAI's ``sparsify.SparseCoder`` (the
   library SAeUron used; its own ``Trainer`` wants a language model): Adam, decoder bias initialised at the data
   mean, unit-norm decoder rows, the AuxK loss on dead latents. It returns a frozen :class:`FeatureDictionary` with
   its site, shape, training config, a hash of its training data and its quality (fraction of variance unexplained,
   L0, dead and dense latents). :func:`save_sae` / :func:`load_sae` write and read it (``sparsify``'s own layout,
   ``sae.safetensors`` + ``cfg.json``, plus ``features.json``), so ``sparsify`` can load it too.
3. :func:`attach`: the latents become components ``<site>#f<i>`` of granularity ``"feature"``
   (``model.space.parse("unet...ff#f12")``, ``model.components("feature")``). Ablating feature ``i`` with
   multiplier ``m`` changes the site's output ``h`` to ``h + (m - 1) (f_i(h) - mu_i) W_dec[i]``
   (:func:`apply_features`): the autoencoder's reconstruction error stays, so with every ``m = 1`` the model is
   bitwise intact, and attaching changes no weight and no output. ``mu = 0`` is zero-ablation (SAeUron's), the
   feature's mean activation over the evaluation inputs mean-ablation.

Encoding here is plain torch, the same operations as ``SparseCoder.encode`` (``relu(W_enc (x - b_dec) + b_enc)``,
then top-k): importing ``sparsify`` (it prints, and pulls in ``datasets``) is needed only to train.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from interp.core import diffusion
from interp.core.diffusion import latent_shape
from interp.core.generation import generate, step_generators
from interp.core.interventions import call_denoiser, encode_prompts, run_text, run_unet
from interp.core.objectives import EVAL_SEED

if TYPE_CHECKING:  # (numpy and pandas are imported where they are used)
    import numpy as np
    import pandas as pd

#: Version of the ``features.json`` :func:`save_sae` writes.
FORMAT = 1


@dataclass(frozen=True, eq=False)
class FeatureDictionary:
    """A trained (or hand-built) top-k sparse autoencoder at one site, frozen.

    Attributes:
        site: the module path whose output it encodes (``unet.mid_block.attentions.0.transformer_blocks.0.ff``).
        W_enc: ``(n_features, d_in)`` encoder weights; ``b_enc`` ``(n_features,)`` its bias.
        W_dec: ``(n_features, d_in)`` decoder directions (unit norm when trained here); ``b_dec`` ``(d_in,)``.
        k: latents kept per row (top-k).
        axis: the feature axis of the site's output: ``-1`` (tokens x features) or ``1`` (channel-first, a conv or a
            UNet attention stage: spatial positions are the rows).
        config: how it was trained (:func:`train_sae`'s arguments, rows of data).
        data_hash: sha256 of its training activations (float32 bytes and shape).
        quality: ``fvu``, ``l0``, ``dead``, ``dense``, ``dead_fraction``, ``dense_fraction`` on its training data
            (:func:`quality`).
    """

    site: str
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    k: int
    axis: int = -1
    config: dict = field(default_factory=dict)
    data_hash: str = ""
    quality: dict = field(default_factory=dict)

    def __post_init__(self):
        n, d = self.W_enc.shape
        if self.W_dec.shape != (n, d) or self.b_enc.shape != (n,) or self.b_dec.shape != (d,):
            raise ValueError(f"SAE weights do not fit together: W_enc {tuple(self.W_enc.shape)}, b_enc "
                             f"{tuple(self.b_enc.shape)}, W_dec {tuple(self.W_dec.shape)}, b_dec {tuple(self.b_dec.shape)}"
                             f"; W_enc and W_dec must be (n_features, d_in), b_enc (n_features,), b_dec (d_in,)")
        if not 1 <= int(self.k) <= n:
            raise ValueError(f"k must be in 1..{n} (the number of features), got {self.k}")
        if self.axis not in (-1, 1):
            raise ValueError(f"axis must be -1 (tokens x features) or 1 (channel-first), got {self.axis}")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):  # frozen: detached copies, never trained further here
            object.__setattr__(self, name, getattr(self, name).detach().clone().requires_grad_(False))
        object.__setattr__(self, "k", int(self.k))

    @property
    def d_in(self) -> int:
        """Width of the rows it encodes."""
        return self.W_enc.shape[1]

    @property
    def n_features(self) -> int:
        """Number of latents (``expansion x d_in`` when trained by :func:`train_sae`)."""
        return self.W_enc.shape[0]

    def digest(self) -> str:
        """16 hex digits of the sha256 of its weights, k and site: what cached results on its features are keyed by."""
        h = hashlib.sha256(f"{self.site}|{self.k}|{self.axis}".encode())
        for t in (self.W_enc, self.b_enc, self.W_dec, self.b_dec):
            h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
        return h.hexdigest()[:16]

    def _weights(self, like: torch.Tensor):
        return [t.to(device=like.device, dtype=like.dtype) for t in (self.W_enc, self.b_enc, self.W_dec, self.b_dec)]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k activations and indices of rows ``x`` ``(R, d_in)``: ``SparseCoder.encode``'s operations."""
        W_enc, b_enc, _, b_dec = self._weights(x)
        pre = torch.nn.functional.relu(torch.nn.functional.linear(x - b_dec, W_enc, b_enc))
        return pre.topk(self.k, dim=-1, sorted=False)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Every latent's activation ``(R, n_features)``: the top-k ones, 0 elsewhere."""
        acts, idx = self.encode(x)
        return torch.zeros(*x.shape[:-1], self.n_features, dtype=x.dtype, device=x.device).scatter(-1, idx, acts)

    def decode(self, acts: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Rows from top-k activations and indices: ``sum_j acts_j W_dec[idx_j] + b_dec``."""
        _, _, W_dec, b_dec = self._weights(acts)
        return (acts.unsqueeze(-1) * W_dec[idx]).sum(-2) + b_dec

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The autoencoder's reconstruction of rows ``x``."""
        return self.decode(*self.encode(x))

    # What the intervention layer calls at a feature site (it imports nothing of this module).
    def apply(self, h: torch.Tensor, mult: torch.Tensor, features: torch.Tensor,
              mean: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`apply_features` with this dictionary."""
        return apply_features(self, h, mult, features, mean)

    def means(self, h: torch.Tensor) -> torch.Tensor:
        """:func:`feature_means` with this dictionary."""
        return feature_means(self, h)


# -- the intervention -------------------------------------------------------------------------------------------------
def rows_of(h: torch.Tensor, axis: int) -> torch.Tensor:
    """A site's output as rows of width d: the feature axis last, every other axis but the batch flattened into
    positions: ``(N, P, d)``."""
    x = h.movedim(1, -1) if axis == 1 else h
    return x.reshape(x.shape[0], -1, x.shape[-1])


def apply_features(sae: FeatureDictionary, h: torch.Tensor, mult: torch.Tensor, features: torch.Tensor,
                   mean: torch.Tensor | None = None) -> torch.Tensor:
    """``h + sum_i (m_i - 1) (f_i(h) - mu_i) W_dec[i]`` over the features ``features`` (multipliers ``mult``,
    ``(N, len(features))``, one row per batch row of ``h``); ``mean`` ``(n_features,)`` are the features' mean
    activations (None: zero-ablation), or a clean output of the site shaped like ``h`` (its row blocks repeated to
    ``h``'s batch), whose features' activations ``mu_i`` then are (causal tracing: ``m = 0`` restores the features'
    clean activations in a corrupted run). The reconstruction error is kept, so ``m = 1`` gives ``h`` exactly."""
    x = rows_of(h, sae.axis)  # (N, P, d)
    if x.shape[-1] != sae.d_in:
        raise ValueError(f"the SAE at {sae.site} encodes rows of width {sae.d_in} but that output has width "
                         f"{x.shape[-1]}: attach an SAE trained on this site")
    feats = features.to(h.device)
    f = sae.dense(x.reshape(-1, x.shape[-1]))[:, feats]  # (N*P, n_sel)
    if mean is not None and mean.dim() == h.dim():  # the site's clean output per row (causal tracing's restoration):
        if mean.shape[0] != h.shape[0]:  # its features' clean activations, row block by row block
            mean = mean.repeat(h.shape[0] // mean.shape[0], *([1] * (h.dim() - 1)))
        xm = rows_of(mean.to(device=h.device, dtype=h.dtype), sae.axis)
        f = f - sae.dense(xm.reshape(-1, xm.shape[-1]))[:, feats]
    elif mean is not None:
        f = f - mean.to(device=h.device, dtype=h.dtype)[feats]
    coef = (mult.to(h.dtype) - 1)[:, None, :]  # (N, 1, n_sel)
    W = sae.W_dec.to(device=h.device, dtype=h.dtype)[feats]  # (n_sel, d)
    delta = (f.reshape(x.shape[0], x.shape[1], -1) * coef) @ W  # (N, P, d)
    if sae.axis == 1:
        moved = h.movedim(1, -1)
        return h + delta.reshape(moved.shape).movedim(-1, 1)
    return h + delta.reshape(h.shape)


def feature_means(sae: FeatureDictionary, h: torch.Tensor) -> torch.Tensor:
    """Every feature's mean activation over the rows and positions of a site's output ``h``: ``(n_features,)``."""
    x = rows_of(h, sae.axis)
    return sae.dense(x.reshape(-1, x.shape[-1])).mean(0)


# -- attaching to a model ----------------------------------------------------------------------------------------------
def site_layout(model, site: str) -> tuple[int, int]:
    """``(axis, width)`` of a module's output (its first tensor): axis 1 for a 4-D channel-first output, else -1.

    Found with a forward hook in one intact pass of the empty prompt (the text encoders and one denoiser call, as
    :class:`interp.core.models.DiffusionModel` does to order its modules): no weight or output changes."""

    if ("out", site) not in model.events:
        prefixes = ", ".join(f"'{p}.'" for p in model.modules())
        raise ValueError(f"{site!r} is no module of this model whose output the suite reaches (prefixes {prefixes}): "
                         f"name a module path such as 'unet.mid_block.attentions.0.transformer_blocks.0.ff'")
    seen = {}

    def hook(mod, args, out):
        first = out[0] if isinstance(out, tuple) else out
        seen.setdefault("shape", tuple(first.shape))

    handle = model.module(site).register_forward_hook(hook)
    try:
        with torch.no_grad():
            ctx = encode_prompts(model, model.tokenize([""], model.device))  # a text-encoder site runs here
            if site.startswith(model.denoiser_part + "."):
                x = torch.zeros(latent_shape(model, 1), dtype=model.dtype, device=model.device)
                call_denoiser(model, x, torch.tensor([1], device=model.device), ctx.to(model.dtype))
    finally:
        handle.remove()
    shape = seen["shape"]
    return (1, shape[1]) if len(shape) == 4 else (-1, shape[-1])


def attach(model, sae: FeatureDictionary) -> FeatureDictionary:
    """Make ``sae``'s latents the feature components ``<sae.site>#f<i>`` of ``model`` (several sites may each have
    one; attaching again at a site replaces its dictionary). No weight or output of the model changes: the
    features act only through the multipliers of a plan (:func:`apply_features`).

    Returns:
        The dictionary as attached (its ``axis`` set from the site's output layout).

    Raises:
        ValueError: the site is no module of the model, or its output width is not the SAE's ``d_in``.
    """
    axis, width = site_layout(model, sae.site)
    if width != sae.d_in:
        raise ValueError(f"the SAE for {sae.site} has d_in={sae.d_in} but that module's output has width {width}: "
                         f"train one on this site (python -m analyses.train_sae --site {sae.site}) or attach it to "
                         f"a site of width {sae.d_in}")
    if axis != sae.axis:
        from dataclasses import replace

        sae = replace(sae, axis=axis)
    model.space.add_feature_site(sae.site, sae, model.module(sae.site))
    return sae


def detach(model, site: str) -> None:
    """Remove the dictionary attached at ``site`` (its feature addresses no longer parse)."""
    model.space.remove_feature_site(site)


def attached(model) -> dict[str, FeatureDictionary]:
    """The dictionaries attached to ``model``, by site."""
    return {p: s.dictionary for p, s in model.space.features.items()}


def identity(model, comps) -> dict[str, str]:
    """The digests of the dictionaries whose features are among ``comps`` (by site): a cached result on features
    is keyed by them, so another SAE at the same site never reads it."""
    sites = sorted({c.module for c in comps if c.granularity == "feature"})
    return {p: model.space.features[p].dictionary.digest() for p in sites}


# -- activations ------------------------------------------------------------------------------------------------------
def collect_activations(model, site: str, prompts: Sequence[str], seeds: Sequence[int] = (0,), steps: int = 10,
                        guidance: float | None = None, positions: int | None = None, seed: int = 0,
                        max_rows: int = 256, progress: bool = False) -> torch.Tensor:
    """The output of module ``site`` over generation trajectories, as float32 rows ``(R, d)`` on the CPU.

    Every prompt is generated from every seed's noise for ``steps`` denoising steps (the model's sampler, guidance
    ``guidance``, default the model's); each denoiser call's output at ``site`` gives one row per token (or, for a
    channel-first output, per spatial position) of every batch row — both classifier-free-guidance branches where
    the model is guided. A text-encoder site gives the prompts' token vectors once. ``positions`` keeps that many
    rows per call, drawn without replacement by a generator seeded with ``seed`` (None: all), to bound memory on
    large models. ``max_rows``: prompts per generation call are chosen so a call holds at most that many UNet rows.

    Raises:
        ValueError: an unknown site, an empty prompt list or no seeds.
    """
    from tqdm.auto import tqdm

    prompts = model.check_prompts(prompts)
    if not seeds:
        raise ValueError("no seeds given: pass at least one seed for the generations' initial noise")
    axis, _ = site_layout(model, site)
    pick = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []

    def keep(h: torch.Tensor):
        h = h[0] if isinstance(h, tuple) else h
        x = rows_of(h.detach(), axis).reshape(-1, h.shape[1] if axis == 1 else h.shape[-1]).float().cpu()
        if positions is not None and positions < len(x):
            x = x[torch.randperm(len(x), generator=pick)[:positions]]
        out.append(x)

    if not site.startswith(model.denoiser_part + "."):  # a text encoder: the prompts' tokens, no trajectory
        with torch.no_grad():
            keep(run_text(model, model.tokenize(prompts, model.device), saves=[site])[1][site])
        return torch.cat(out)
    guidance = model.default_guidance if guidance is None else guidance
    guided = guidance != 1.0 and model.family.cfg
    per_call = max(1, max_rows // (2 if guided else 1))
    calls = [(s, prompts[i : i + per_call]) for s in seeds for i in range(0, len(prompts), per_call)]
    with torch.no_grad():
        for s, group in tqdm(calls, desc=f"activations {site}", disable=not progress):
            n = len(group)
            context = run_text(model, model.tokenize(group, model.device))[0]
            uncond = None
            if guided:
                uncond = model.family.uncond(model, context)
                if uncond is None:
                    uncond = run_text(model, model.tokenize([""] * n, model.device))[0]
            gen = torch.Generator().manual_seed(int(s))
            latents = diffusion.initial_noise(model, n, gen, diffusion.accumulation_dtype(model.dtype), model.device)

            def unet_fn(x, t, ctx, step):
                eps, saved = run_unet(model, x, t, ctx, saves=[site], guidance=guidance)
                keep(saved[site])
                return eps

            diffusion.denoise(unet_fn, diffusion.fresh_scheduler(model.scheduler), latents, context, uncond, steps,
                              guidance, generator=step_generators(int(s), range(n)),
                              set_timesteps=model.family.set_timesteps)
    return torch.cat(out)


def data_hash(acts: torch.Tensor) -> str:
    """sha256 of activations (their float32 bytes and shape): which data an SAE was trained on."""
    x = acts.detach().cpu().float().contiguous()
    h = hashlib.sha256(str(tuple(x.shape)).encode())
    h.update(x.numpy().tobytes())
    return h.hexdigest()


# -- training ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """``sparsify`` prints a line when it is imported (which decoder it uses): keep it off the caller's output."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _sparse_coder(d: int, n: int, k: int):
    with _quiet():
        from sparsify import SparseCoder, SparseCoderConfig
    return SparseCoder(d, SparseCoderConfig(k=k, num_latents=n, expansion_factor=max(1, n // d)))


def _batch(n_rows: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """Row indices of training step ``step``: epochs of seeded permutations, a pure function of its arguments (so a
    resumed run draws the batches an uninterrupted one does)."""
    per_epoch = n_rows // batch
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[i * batch : (i + 1) * batch]


def train_sae(acts: torch.Tensor, k: int = 8, expansion: int = 4, steps: int = 2000, lr: float | None = None,
              seed: int = 0, batch: int = 1024, site: str = "", auxk_alpha: float = 1 / 32,
              dead_rows: int | None = None, checkpoint: str | Path | None = None, checkpoint_every: int = 200,
              progress: bool = False) -> FeatureDictionary:
    """A top-k sparse autoencoder on rows ``acts`` ``(R, d)``, trained for ``steps`` Adam steps; seeded and
    deterministic (the same arguments give bitwise the same dictionary on the same machine).

    The loop is sparsify's Trainer reduced to what non-language-model data needs (Gao et al. 2024, section 2 and
    appendix A-B): the decoder bias starts at the data mean; the loss is the fraction of variance unexplained plus
    ``auxk_alpha`` times the AuxK loss (the ``d/2`` largest dead latents predict the residual; a latent is dead when
    it fired on none of the last ``dead_rows`` rows, default one pass over the data); the gradient parallel to each
    decoder row is removed and the rows are renormalized to unit norm after every step. Batches are epochs of seeded
    permutations. ``lr`` None: sparsify's default, ``2e-4 / sqrt(n_features / 2**14)``.

    ``checkpoint``: a file where the step, the weights, Adam's state and the dead-latent counters are written every
    ``checkpoint_every`` steps (atomically); a call with the same file and arguments resumes there and ends with
    the same dictionary as an uninterrupted run. It is left in place when training ends.

    Raises:
        ValueError: bad shapes or counts (naming the argument), or a checkpoint written with other arguments.
    """
    from tqdm.auto import tqdm

    if acts.dim() != 2 or len(acts) < 2:
        raise ValueError(f"acts must be rows (R, d) with R >= 2, got shape {tuple(acts.shape)}: collect them with "
                         f"interp.core.features.collect_activations")
    for name, v in (("k", k), ("expansion", expansion), ("steps", steps), ("batch", batch),
                    ("checkpoint_every", checkpoint_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"train_sae: {name} must be an integer >= 1, got {v!r}")
    x_all = acts.detach().float().cpu().contiguous()
    R, d = x_all.shape
    n = d * expansion
    if k > n:
        raise ValueError(f"train_sae: k={k} is more than the {n} features (expansion {expansion} x d {d}): lower k")
    batch = min(batch, R)
    lr = lr if lr is not None else 2e-4 / (n / 2**14) ** 0.5
    dead_rows = dead_rows if dead_rows is not None else R
    config = {"k": k, "expansion": expansion, "n_features": n, "steps": steps, "lr": lr, "seed": seed,
              "batch": batch, "auxk_alpha": auxk_alpha, "dead_rows": dead_rows, "rows": R, "d_in": d,
              "optimizer": "adam", "library": "eai-sparsify " + _sparsify_version()}
    digest = data_hash(x_all)
    with torch.random.fork_rng(devices=[]):  # the initialization's draws, from the seed, not the caller's stream
        torch.manual_seed(seed)
        sae = _sparse_coder(d, n, k)
    with torch.no_grad():
        sae.b_dec.copy_(x_all.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr, eps=6.25e-10)  # sparsify's Adam epsilon
    since_fired = torch.zeros(n, dtype=torch.long)
    start = 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    key = {"config": config, "data_hash": digest}
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        if json.loads(state["key"]) != key:
            raise ValueError(f"checkpoint {ckpt} was written by a run with other data or arguments: delete it or "
                             f"pass another --out folder")
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["opt"])
        since_fired = state["since_fired"]
        start = int(state["step"])
    with tqdm(total=steps, initial=start, desc="SAE", disable=not progress) as bar:
        for step in range(start, steps):
            x = x_all[_batch(R, batch, seed, step)]
            dead = since_fired > dead_rows
            out = sae(x, dead_mask=dead if auxk_alpha > 0 else None)
            loss = out.fvu + auxk_alpha * out.auxk_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            sae.set_decoder_norm_to_unit_norm()
            fired = torch.zeros(n, dtype=torch.bool)
            fired[out.latent_indices[out.latent_acts > 0].unique()] = True
            since_fired += len(x)
            since_fired[fired] = 0
            bar.update()
            if progress:
                bar.set_postfix(fvu=f"{float(out.fvu):.3f}", dead=int(dead.sum()))
            if ckpt is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                _save_checkpoint(ckpt, {"key": json.dumps(key), "sae": sae.state_dict(), "opt": opt.state_dict(),
                                        "since_fired": since_fired, "step": step + 1})
    raw = FeatureDictionary(site, sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec, k, config=config,
                            data_hash=digest)
    return FeatureDictionary(site, raw.W_enc, raw.b_enc, raw.W_dec, raw.b_dec, k, config=config, data_hash=digest,
                             quality=quality(raw, x_all))


def _sparsify_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("eai-sparsify")
    except PackageNotFoundError:
        return "?"


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a run killed while writing leaves the previous checkpoint whole


@torch.no_grad()
def quality(sae: FeatureDictionary, acts: torch.Tensor, chunk: int = 8192, dense_above: float = 0.1) -> dict:
    """How well ``sae`` encodes rows ``acts``: ``fvu`` (fraction of variance unexplained,
    ``sum |x - x_hat|^2 / sum |x - mean|^2``), ``l0`` (mean number of active latents per row, at most k), ``dead``
    (latents never active on these rows), ``dense`` (latents active on more than ``dense_above`` of the rows), and
    those two as fractions of the features."""
    x_all = acts.float()
    mean = x_all.mean(0)
    err = var = 0.0
    active = 0
    counts = torch.zeros(sae.n_features, dtype=torch.long)
    for s in range(0, len(x_all), chunk):
        x = x_all[s : s + chunk]
        a, i = sae.encode(x)
        err += float((x - sae.decode(a, i)).double().pow(2).sum())
        var += float((x - mean).double().pow(2).sum())
        on = a > 0
        active += int(on.sum())
        counts += torch.bincount(i[on], minlength=sae.n_features)
    n = sae.n_features
    dead = int((counts == 0).sum())
    dense = int((counts > dense_above * len(x_all)).sum())
    return {"fvu": err / var if var > 0 else float("nan"), "l0": active / len(x_all), "dead": dead, "dense": dense,
            "dead_fraction": dead / n, "dense_fraction": dense / n, "n_features": n, "rows": len(x_all)}


# -- saving and loading -----------------------------------------------------------------------------------------------
def save_sae(sae: FeatureDictionary, folder: str | Path) -> Path:
    """Write ``sae`` to ``folder``: ``sae.safetensors`` and ``cfg.json`` in sparsify's layout (so
    ``sparsify.SparseCoder.load_from_disk(folder)`` reads it too) and ``features.json`` (site, layout, training
    config, data hash, quality). Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"encoder.weight": sae.W_enc.contiguous(), "encoder.bias": sae.b_enc.contiguous(),
               "W_dec": sae.W_dec.contiguous(), "b_dec": sae.b_dec.contiguous()}, str(folder / "sae.safetensors"))
    cfg = {"activation": "topk", "expansion_factor": max(1, sae.n_features // sae.d_in), "normalize_decoder": True,
           "num_latents": sae.n_features, "k": sae.k, "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": sae.d_in}
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=1))
    meta = {"format": FORMAT, "site": sae.site, "axis": sae.axis, "k": sae.k, "d_in": sae.d_in,
            "n_features": sae.n_features, "config": sae.config, "data_hash": sae.data_hash, "quality": sae.quality,
            "digest": sae.digest(), "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (folder / "features.json").write_text(json.dumps(meta, indent=1))
    return folder


def load_sae(folder: str | Path, site: str | None = None) -> FeatureDictionary:
    """Read an SAE written by :func:`save_sae` (or by sparsify: then ``site`` must name the module it encodes).

    Raises:
        ValueError: a missing or unreadable folder or file, or no site known, naming the fix.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = folder / "sae.safetensors"
    if not weights.is_file():
        raise ValueError(f"{folder} holds no sae.safetensors: pass a folder written by analyses.train_sae (or "
                         f"sparsify's save_to_disk)")
    try:
        t = load_file(str(weights))
        cfg = json.loads((folder / "cfg.json").read_text())
        meta = json.loads((folder / "features.json").read_text()) if (folder / "features.json").is_file() else {}
    except Exception as err:  # safetensors, json and OS errors alike: the folder is unusable as it is
        raise ValueError(f"{folder} is not a readable SAE ({' '.join(str(err).split())[:160]}): write it again "
                         f"with analyses.train_sae") from None
    site = site or meta.get("site")
    if not site:
        raise ValueError(f"{folder} does not say which module it encodes: pass site= (the module path)")
    return FeatureDictionary(site, t["encoder.weight"], t["encoder.bias"], t["W_dec"], t["b_dec"], cfg["k"],
                             axis=meta.get("axis", -1), config=meta.get("config", {}),
                             data_hash=meta.get("data_hash", ""), quality=meta.get("quality", {}))


def planted(site: str, directions: torch.Tensor, k: int | None = None, axis: int = -1) -> FeatureDictionary:
    """A hand-built dictionary whose features are exactly ``directions`` ``(n, d)`` (normalized): encoder =
    decoder, zero biases. On rows that are non-negative sums of at most ``k`` orthonormal directions its encoding
    is exact (a known-answer SAE for tests and tutorials)."""
    W = directions / directions.norm(dim=1, keepdim=True)
    n, d = W.shape
    return FeatureDictionary(site, W, torch.zeros(n), W, torch.zeros(d), k or n, axis=axis,
                             config={"planted": True})


# -- ground truth: which features detect which attribute value --------------------------------------------------------
#: AUROC from which a feature counts as a monosemantic detector of a value (issue 40's target).
MONOSEMANTIC = 0.95
#: Timestep bands of the ground truth, as fractions of the training schedule: (name, low, high], high noise first.
BANDS = (("high", 2 / 3, 1.0), ("mid", 1 / 3, 2 / 3), ("low", 0.0, 1 / 3))


def site_means(sae: FeatureDictionary, h: torch.Tensor, pool: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """One site output ``h`` (a batch) summarized per batch row: every feature's activation and every output
    channel's value (the site's neurons), each averaged over the row's positions (``pool="max"``: the largest over
    the positions, for a feature that fires on a few positions only, e.g. the shape's, and is diluted by the mean
    over a mostly-background image): ``(N, n_features)``, ``(N, d)``."""
    if pool not in ("mean", "max"):
        raise ValueError(f"pool must be 'mean' or 'max', got {pool!r}")
    x = rows_of(h.detach(), sae.axis)  # (N, P, d)
    if x.shape[-1] != sae.d_in:
        raise ValueError(f"the SAE at {sae.site} encodes rows of width {sae.d_in} but that output has width "
                         f"{x.shape[-1]}: pass an SAE trained on this site")
    f = sae.dense(x.reshape(-1, x.shape[-1]).float()).reshape(x.shape[0], x.shape[1], -1)
    if pool == "max":
        return f.amax(1), x.float().amax(1)
    return f.mean(1), x.float().mean(1)


def auroc(scores, labels) -> "np.ndarray":
    """AUROC of every score column for every label column: ``scores`` ``(N, F)``, ``labels`` ``(N, V)`` booleans;
    returns ``(V, F)``. The Mann-Whitney statistic with average ranks for ties (what
    ``sklearn.metrics.roc_auc_score`` gives, vectorized over columns): the probability that an image with the label
    scores above one without it, ties counting half. A column whose label is always or never present is NaN."""
    import numpy as np
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.ndim != 2 or y.ndim != 2 or len(s) != len(y):
        raise ValueError(f"auroc: scores (N, F) and labels (N, V) must have the same N, got {s.shape} and {y.shape}")
    ranks = rankdata(s, axis=0)  # (N, F), average ranks
    n_pos = y.sum(0).astype(np.float64)  # (V,)
    n_neg = len(y) - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (y.T.astype(np.float64) @ ranks - (n_pos * (n_pos + 1) / 2)[:, None]) / (n_pos * n_neg)[:, None]
    out[(n_pos == 0) | (n_neg == 0)] = np.nan
    return out


def ground_truth_table(features, neurons, labels: "pd.DataFrame", bands: dict | None = None) -> "pd.DataFrame":
    """Per attribute value, the feature and the neuron that detect it best.

    ``features`` ``(N, n_features)`` and ``neurons`` ``(N, d)``: each image's activations (mean over positions and
    timesteps); ``labels``: one boolean column per value (``<attribute>:<value>``), True where the image's prompt
    names it; ``bands``: band name -> ``(N, n_features)`` features averaged over that band's timesteps only.

    A feature detects a value when it fires more on images of it: its AUROC is of its activation as is (an SAE
    latent is non-negative, and a latent that is *off* for a value is no detector of it), and the best feature is
    the one of highest AUROC (``>= 0.5`` whenever some feature is uninformative). A neuron's sign is arbitrary (the
    next layer may read it negated), so a neuron's AUROC is the better of its value and its negation's
    (``neuron_sign`` -1 for the negation): the comparison favours the neurons, not the features. ``monosemantic``:
    the best feature's AUROC is at least :data:`MONOSEMANTIC`.
    """
    import numpy as np
    import pandas as pd

    names = list(labels.columns)
    y = labels.to_numpy(bool)
    fa = auroc(features, y)  # (V, F)
    na = auroc(neurons, y)  # (V, d)
    signed = np.where(na >= 1 - na, na, 1 - na)
    rows = []
    for v, name in enumerate(names):
        attribute, value = name.split(":", 1)
        row = {"attribute": attribute, "value": value, "n_pos": int(y[:, v].sum()), "n_neg": int((~y[:, v]).sum())}
        if np.isnan(fa[v]).all():
            rows.append({**row, "feature": -1, "feature_auroc": np.nan, "neuron": -1, "neuron_auroc": np.nan,
                         "neuron_sign": 0, "monosemantic": False})
            continue
        f = int(np.nanargmax(fa[v]))
        n = int(np.nanargmax(signed[v]))
        row.update({"feature": f, "feature_auroc": float(fa[v, f]),
                    "neuron": n, "neuron_auroc": float(signed[v, n]), "neuron_sign": 1 if na[v, n] >= 0.5 else -1,
                    "monosemantic": bool(fa[v, f] >= MONOSEMANTIC)})
        for band, acts in (bands or {}).items():
            ba = auroc(acts, y[:, [v]])[0]
            b = int(np.nanargmax(ba)) if not np.isnan(ba).all() else -1
            row[f"feature_{band}"] = b
            row[f"auroc_{band}"] = float(ba[b]) if b >= 0 else np.nan
            row[f"best_feature_auroc_{band}"] = float(ba[f]) if b >= 0 else np.nan  # the overall best, in this band
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """What :func:`value_auroc` measured: the table (one row per attribute value), the images' prompts and labels,
    their activations and the generated images (for galleries)."""

    table: "pd.DataFrame"  # ground_truth_table's columns
    images: "pd.DataFrame"  # one row per image: prompt, the value asked for per attribute, the judge's verdicts
    features: torch.Tensor  # (N, S, n_features) activation per image and denoising step (mean over positions)
    neurons: torch.Tensor  # (N, S, d) the site's output channels per image and step (mean over positions)
    timesteps: tuple[int, ...]  # (S,) the denoising steps' timesteps
    pixels: torch.Tensor  # (N, 3, H, W) generated images in [0, 1]
    summary: dict = field(default_factory=dict)


def heldout_scenes(model, n_images: int, seed: int) -> tuple[list[dict], tuple]:
    """``n_images`` held-out captions with known attributes from the world plugin (``model.world``): the 16 values
    take turns as the pinned value of a scene (so every value has about ``n_images / 16`` images that surely show
    it, besides the random draws of the others), each value's scenes from its own stream of the held-out seed
    ``seed``; every caption names all four attributes. Returns the rows (prompt and the value per attribute) and
    the scenes."""
    values = [v for vals in model.world.attributes.values() for v in vals]
    per = [n_images // len(values) + (1 if i < n_images % len(values) else 0) for i in range(len(values))]
    rows, scenes = [], []
    for i, (value, n) in enumerate(zip(values, per)):
        if n == 0:
            continue
        _, r, s = model.world.heldout_prompts(value, n, 0, 0, seed + 101 * i)
        rows += [{k: v for k, v in row.items() if k != "set"} for row in r]
        scenes += list(s)
    return rows, tuple(scenes)


def value_auroc(model, sae: FeatureDictionary, n_images: int = 256, steps: int = 10, seed: int | None = None,
                guidance: float | None = None, batch: int = 64, judge=None, pool: str = "mean",
                progress: bool = False) -> GroundTruth:
    """Ground truth for the features of ``sae`` on a concept world: which feature detects which attribute value.

    ``n_images`` held-out images with known attributes (:func:`heldout_scenes`, the seed stream of the edit
    evaluation, :data:`interp.core.objectives.EVAL_SEED` + ``seed``: scenes and noises no SAE or attribution saw)
    are generated; at every denoising step the site's output is encoded (conditional branch) and each feature's
    activation and each output channel (neuron) averaged over the positions (``pool="max"``: their largest value;
    :func:`site_means`). Averaged over the
    steps (and over each band of :data:`BANDS`), they are scored against the labels "the prompt names value v" by
    AUROC (:func:`ground_truth_table`). ``judge`` (a :class:`~interp.core.judges.Judge`, optional): its verdicts on the
    images are kept in ``images`` (``pred_<attribute>``). Nothing is changed in the model: the site is only read.

    Raises:
        ValueError: the model has no concept world, or the SAE's site is not attached-compatible.
    """
    import numpy as np
    import pandas as pd

    if model.world is None:
        raise ValueError(f"{getattr(model, 'name', 'this model')} has no concept world: the ground truth needs "
                         f"images with known attributes (use a concept-world model)")
    if pool not in ("mean", "max"):
        raise ValueError(f"value_auroc: pool must be 'mean' or 'max', got {pool!r}")
    if n_images < 2 or steps < 1 or batch < 1:
        raise ValueError(f"value_auroc: n_images must be >= 2, steps and batch >= 1, got {n_images}, {steps}, {batch}")
    sae = attach(model, sae)  # checks the site and width, sets the layout (no weight or output changes)
    seed = EVAL_SEED + (seed or 0)
    rows, _ = heldout_scenes(model, n_images, seed)
    prompts = [r["prompt"] for r in rows]
    latents = diffusion.initial_noise(model, len(prompts), torch.Generator().manual_seed(seed), model.dtype,
                                      model.device)
    feats, neurons, pixels = [], [], []
    from tqdm.auto import tqdm

    with torch.no_grad():
        for s in tqdm(range(0, len(prompts), batch), desc="ground truth", disable=not progress):
            recorded: dict = {}
            pixels.append(generate(model, prompts[s : s + batch], steps=steps, guidance=guidance,
                                   latents=latents[s : s + batch], record=[sae.site], recorded=recorded,
                                   max_rows=2 * batch, noise_ids=range(s, s + len(latents[s : s + batch]))).float().cpu())
            per_step = [site_means(sae, recorded[i][sae.site], pool) for i in sorted(recorded)]
            feats.append(torch.stack([f for f, _ in per_step], 1).cpu())
            neurons.append(torch.stack([n for _, n in per_step], 1).cpu())
    F, Nn, px = torch.cat(feats), torch.cat(neurons), torch.cat(pixels)
    sched = diffusion.fresh_scheduler(model.scheduler)
    if model.family.set_timesteps is not None:
        model.family.set_timesteps(sched, steps, model.device, latents[:1].shape)
    else:
        sched.set_timesteps(steps)
    timesteps = tuple(int(t) for t in sched.timesteps)
    T = diffusion.num_train_timesteps(model.scheduler)
    images = pd.DataFrame(rows)
    labels = pd.DataFrame({f"{a}:{v}": (images[a] == v).to_numpy() for a, vals in model.world.attributes.items()
                           for v in vals})
    bands = {}
    for name, lo, hi in BANDS:
        idx = [i for i, t in enumerate(timesteps) if lo * T < t <= hi * T or (lo == 0 and t == 0)]
        if idx:
            bands[name] = F[:, idx].mean(1).numpy()
    table = ground_truth_table(F.mean(1).numpy(), Nn.mean(1).numpy(), labels, bands)
    if judge is not None:
        probs = judge.predict(px, model.world.attributes)
        for a, vals in model.world.attributes.items():
            images[f"pred_{a}"] = [vals[i] for i in probs[a].argmax(-1).tolist()]
    fa = table["feature_auroc"].to_numpy(float)
    summary = {"site": sae.site, "sae_digest": sae.digest(), "n_features": sae.n_features, "d": sae.d_in, "pool": pool,
               "n_images": len(images), "steps": steps, "seed": seed, "timesteps": list(timesteps),
               "bands": {n: [lo * T, hi * T] for n, lo, hi in BANDS if n in bands},
               "monosemantic_threshold": MONOSEMANTIC,
               "n_values": int(np.isfinite(fa).sum()), "n_monosemantic": int(table["monosemantic"].sum()),
               "fraction_monosemantic": float(table["monosemantic"].mean()),
               "mean_best_feature_auroc": float(np.nanmean(fa)),
               "mean_best_neuron_auroc": float(np.nanmean(table["neuron_auroc"].to_numpy(float))),
               "values_feature_beats_neuron": int((table["feature_auroc"] > table["neuron_auroc"]).sum()),
               "distinct_best_features": int(table.loc[table["feature"] >= 0, "feature"].nunique())}
    return GroundTruth(table, images, F, Nn, timesteps, px, summary)


@contextlib.contextmanager
def spliced(model, sae: FeatureDictionary):
    """``model`` with ``sae``'s reconstruction in place of its site's output (the reconstruction error dropped): what
    the model computes through the dictionary alone, for measuring what the SAE loses. A forward hook on the site,
    removed on exit, also on an error; no weight changes."""
    axis, width = site_layout(model, sae.site)
    if width != sae.d_in:
        raise ValueError(f"the SAE for {sae.site} has d_in={sae.d_in} but that module's output has width {width}")

    def hook(mod, args, out):
        first = out[0] if isinstance(out, tuple) else out
        x = rows_of(first, axis)
        rec = sae.reconstruct(x.reshape(-1, width).float()).to(first.dtype)
        new = rec.reshape(first.movedim(1, -1).shape).movedim(-1, 1) if axis == 1 else rec.reshape(first.shape)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = model.module(sae.site).register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


def splice_effect(model, sae: FeatureDictionary, n_images: int = 64, steps: int = 10, seed: int | None = None,
                  guidance: float | None = None, batch: int = 64, judge=None,
                  timesteps: Sequence[int] = (100, 300, 500, 700, 900)) -> dict:
    """What splicing ``sae`` into its site (:func:`spliced`) costs the model, on the held-out scenes of
    :func:`heldout_scenes` (seed stream :data:`~interp.core.objectives.EVAL_SEED` + ``seed``):

    - ``loss_intact``, ``loss_spliced``: the denoising loss (mean squared error of the denoiser's prediction against
      its target, conditional branch) on the intact model's own generated images, noised at ``timesteps`` with
      seeded noise, and ``loss_ratio`` (spliced / intact);
    - ``fidelity_intact``, ``fidelity_spliced``: with a ``judge``, the share of (image, attribute) pairs where the
      judge reads the value the prompt names, on images generated from the same noises with and without the splice
      (``fidelity_<attribute>_...`` per attribute).

    Raises:
        ValueError: the model has no concept world, or the SAE does not fit its site.
    """
    import numpy as np

    if model.world is None:
        raise ValueError(f"{getattr(model, 'name', 'this model')} has no concept world: the splice effect is "
                         f"measured on held-out images with known attributes (use a concept-world model)")
    seed = EVAL_SEED + (seed or 0)
    rows, _ = heldout_scenes(model, n_images, seed)
    prompts = [r["prompt"] for r in rows]
    noise = diffusion.initial_noise(model, len(prompts), torch.Generator().manual_seed(seed), model.dtype,
                                    model.device)

    def images():
        return torch.cat([generate(model, prompts[s : s + batch], steps=steps, guidance=guidance,
                                   latents=noise[s : s + batch], max_rows=2 * batch,
                                   noise_ids=range(s, s + len(noise[s : s + batch])))
                          for s in range(0, len(prompts), batch)])

    with torch.no_grad():
        intact = images()
        with spliced(model, sae):
            edited = images()
        x0 = diffusion.encode(intact.to(model.device, model.dtype) * 2 - 1, model.vae)  # (pixels: the images)
        ctx = encode_prompts(model, model.tokenize(prompts, model.device)).to(model.dtype)
        sched, g = model.scheduler, torch.Generator().manual_seed(seed + 1)
        noised = []  # (x_t, t, target) per timestep, the same noise for both runs
        for t in timesteps:
            eps = diffusion.randn(x0.shape, g, x0.dtype, x0.device)
            tt = torch.full((len(x0),), int(t), device=model.device)
            noised.append((diffusion.add_noise(sched, x0, eps, tt), tt, diffusion.denoising_target(sched, x0, eps, tt)))

        def loss(x_t, tt, target) -> float:
            pred = torch.cat([call_denoiser(model, x_t[s : s + batch], tt[s : s + batch], ctx[s : s + batch])
                              for s in range(0, len(x0), batch)])
            return float((pred.float() - target.float()).pow(2).mean())

        losses = {"intact": [loss(*n) for n in noised]}
        with spliced(model, sae):
            losses["spliced"] = [loss(*n) for n in noised]
    out = {"site": sae.site, "sae_digest": sae.digest(), "n_images": len(prompts), "steps": steps,
           "timesteps": list(timesteps), "loss_intact": float(np.mean(losses["intact"])),
           "loss_spliced": float(np.mean(losses["spliced"]))}
    out["loss_ratio"] = out["loss_spliced"] / out["loss_intact"]
    if judge is not None:
        attrs = model.world.attributes
        for name, px in (("intact", intact), ("spliced", edited)):
            probs = judge.predict(px, attrs)
            hits = []
            for a, vals in attrs.items():
                read = [vals[i] for i in probs[a].argmax(-1).tolist()]
                ok = np.mean([r == row[a] for r, row in zip(read, rows)])
                out[f"fidelity_{a}_{name}"] = float(ok)
                hits.append(ok)
            out[f"fidelity_{name}"] = float(np.mean(hits))
    return out


def gallery_figure(gt: GroundTruth, n_top: int = 8, cols: int = 4):
    """The feature gallery: for each value, its best feature's ``n_top`` top-activating generated images (titled
    with the activation; a green frame where the prompt names the value, red where it does not) and the feature's
    mean activation by timestep on images with and without the value. A matplotlib Figure (no pyplot)."""
    import numpy as np
    from matplotlib.figure import Figure

    t = gt.table[gt.table["feature"] >= 0].reset_index(drop=True)
    n_top = max(1, min(n_top, len(gt.images)))
    grid_rows = -(-n_top // cols)
    fig = Figure(figsize=(2.9 * 4, 1.0 + 2.2 * -(-len(t) // 4) * (grid_rows * 0.55 + 0.8)), layout="constrained")
    outer = fig.add_gridspec(-(-len(t) // 4) if len(t) else 1, 4)
    ts = np.array(gt.timesteps)
    for i, r in t.iterrows():
        sub = outer[i // 4, i % 4].subgridspec(grid_rows + 1, cols, height_ratios=[1] * grid_rows + [1.3])
        f = int(r["feature"])
        act = gt.features[:, :, f].mean(1).numpy()
        top = np.argsort(-act, kind="stable")[:n_top]
        pos = (gt.images[r["attribute"]] == r["value"]).to_numpy()
        for j, idx in enumerate(top):
            ax = fig.add_subplot(sub[j // cols, j % cols])
            ax.imshow(gt.pixels[idx].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            for side in ax.spines.values():
                side.set_edgecolor("tab:green" if pos[idx] else "tab:red")
                side.set_linewidth(2)
            ax.set_title(f"{act[idx]:.2g}", fontsize=6, pad=1)
            if j == 0:
                ax.set_ylabel(f"{r['value']}\nf{f} AUROC {r['feature_auroc']:.2f}", fontsize=7)
        ax = fig.add_subplot(sub[grid_rows, :])
        per_t = gt.features[:, :, f].numpy()
        ax.plot(ts, per_t[pos].mean(0) if pos.any() else np.zeros(len(ts)), "o-", ms=2, color="tab:green",
                label=r["value"])
        ax.plot(ts, per_t[~pos].mean(0) if (~pos).any() else np.zeros(len(ts)), "o-", ms=2, color="0.5",
                label="others")
        ax.invert_xaxis()
        ax.tick_params(labelsize=6)
        ax.set_xlabel("timestep (noise high to low)", fontsize=6)
        ax.legend(fontsize=5, frameon=False)
    fig.suptitle("feature gallery: each value's best feature, its top-activating held-out images (green frame: the "
                 "prompt names the value) and its mean activation by timestep")
    return fig
