"""Objectives J and the fixed evaluation set every method attributes.

Every method in the suite explains the same function: J of a concept, averaged over one seeded evaluation set
(images x noises x timesteps) built once per (model, concept, config). Three objectives:

``erase``
    CAD's erase objective (Nguyen et al. 2024): ``J = mean (eps(z_t, c) - eps(z_t, c_anchor))^2``, how differently
    the model denoises with and without the concept in the prompt (``eps`` is the UNet's output: the noise for
    epsilon models such as SD 1.x, the velocity for v-prediction models such as SD 2.x and the concept world). CAD stops the gradient through the anchor
    branch; whether the anchor branch is *also ablated* when a component is ablated is a real choice (see
    ``shared/notes/anchors.md``): ``anchor="shared"`` (default) runs the anchor through the same intervened model,
    so J stays a measure of the concept's effect, and gradients flow through both branches; ``anchor="frozen"``
    keeps the anchor's prediction of the intact model, which is CAD's stop-gradient taken literally.
``amplify``
    The negative denoising loss on images of the concept, ``J = -mean (eps(z_t, c) - target)^2`` (CAD's amplify
    objective, signed so that higher J = the concept is modeled better; the target is the noise or the velocity,
    whichever the model predicts).
``classifier``
    End to end: an image judge's probability of the concept on images generated from the target prompts and fixed
    noises (:mod:`interp.core.judges`: the concept world's classifier by default, or CLIP zero-shot on any model;
    ``ObjectiveConfig.judge`` or ``Objective(..., judge=...)``).

In the concept world ``z_t`` are forward-noised renders of the target scenes (the images the prompts describe); on
other models they are forward-noised samples the model generates for its target prompts. Means are over pixels, so
J's scale does not depend on the resolution. All methods share the sign convention: a component's score is
positive when ablating it lowers J.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from interp.core import diffusion
from interp.core.components import is_text_part
from interp.core.concepts import Concept, resolve
from interp.core.generation import generate
from interp.core.interventions import (
    Plan,
    parameters_requiring_grad,
    run_text,
    run_unet,
    run_unet_in_passes,
    unit_means,
)
from interp.core.judges import load_judge
from interp.core.models import DiffusionModel, model_fingerprint, module_digest
from interp.core.prefix import (
    earliest_active_event,
    fill_bytes,
    frontier,
    intact_outputs,
    module_bytes,
    module_flops,
    nbytes,
    replay_pays,
    rows_of,
    skippable,
)
from interp.core.tokens import bind as bind_tokens

KINDS = ("erase", "amplify", "classifier")
#: Precision of the forward passes. Objective values, gradients with respect to multipliers and statistics are
#: accumulated in float32 (float64 for a float64 objective, the ground-truth setting), whatever the forward precision.
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: The largest seed: every seed is offset (and mixed) into torch's 64-bit generator seeds, which overflow beyond.
MAX_SEED = 2**62
#: Seed stream of held-out scenes and noises, which no objective sees (the attributions use 0.., edits 30,000,
#: fidelity 10,000).
EVAL_SEED = 20_000

#: Bytes an objective's replay cache may hold (:attr:`Objective.replay_budget`; :func:`interp.studies.plan.preflight`
#: holds as much of the device while it tries a run's largest passes).
REPLAY_BUDGET = 2**31


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which J, on which evaluation set. Frozen; :meth:`hash` keys caches."""

    kind: str = "erase"
    anchor: str = "shared"
    n_images: int = 4  # the comparison's defaults (compare_methods --images, --timesteps): one evaluation set
    timesteps: tuple[int, ...] = (250, 600)
    seed: int = 0
    gen_steps: int = 10
    guidance: float | None = None  # None: the model's default (1.0 for the concept world, 7.5 otherwise)
    dtype: str = "float32"
    #: UNet rows per forward pass: only speed, memory and rounding depend on it. On a 2-core CPU larger batches
    #: outgrow the caches and run slower (README, Benchmarks); a GPU wants more.
    max_batch: int = 256
    #: The image judge of the ``classifier`` objective (:func:`interp.core.judges.load_judge`): "classifier" (the
    #: concept world's), "concept-world-clip", a CLIP folder or hub id. Unused by erase and amplify.
    judge: str = "classifier"

    def __post_init__(self):
        def whole(name, v, low):  # an int (not a bool, not a float) >= low
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"ObjectiveConfig.{name} must be an integer >= {low}, got {v!r}")

        if self.kind not in KINDS:
            raise ValueError(f"unknown objective {self.kind!r}; objectives are {KINDS}")
        if self.anchor not in ("shared", "frozen"):
            raise ValueError(f"anchor must be 'shared' or 'frozen', got {self.anchor!r}")
        if isinstance(self.timesteps, (str, int)) or not self.timesteps:
            raise ValueError(f"timesteps must be a non-empty sequence of integers, got {self.timesteps!r}")
        for t in self.timesteps:
            whole("timesteps", t, 0)  # the upper bound is the scheduler's: checked by Objective
        for name, low in (("n_images", 1), ("seed", 0), ("gen_steps", 1), ("max_batch", 1)):
            whole(name, getattr(self, name), low)
        if self.seed > MAX_SEED:  # seeds are offset and mixed into 64-bit generator seeds
            raise ValueError(f"ObjectiveConfig.seed must be at most {MAX_SEED} (2**62), got {self.seed}")
        if self.guidance is not None and not (isinstance(self.guidance, (int, float)) and 0 <= self.guidance < 1e4):
            raise ValueError(f"guidance must be None (the model's default) or a scale >= 0, got {self.guidance!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))

    def to_dict(self) -> dict:
        """The fields as a plain dict (for metadata and the hash)."""
        return asdict(self)

    def hash(self) -> str:
        """12 hex digits of the SHA-256 of the fields: the key caches of this objective's results use."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


class NonFiniteObjectiveError(FloatingPointError):
    """J came out NaN or infinite."""


class Objective:
    """J of one concept on one model over its fixed evaluation set.

    ``values(plan, mult)`` returns J per mask row and per sample, shape ``(R, S)``; ``intact`` is ``(S,)``.
    Gradients flow when the caller enables them (``mult`` may require grad).
    """

    def __init__(self, model, concept: str | Concept, config: ObjectiveConfig | str | None = None, judge=None):
        if isinstance(config, str):  # objective="erase": the kind alone
            config = ObjectiveConfig(kind=config)
        if config is not None and not isinstance(config, ObjectiveConfig):
            raise TypeError(f"objective must be an ObjectiveConfig, an Objective or a kind {KINDS}, not "
                            f"{type(config).__name__}")
        self.config = cfg = config or ObjectiveConfig()
        n_train = int(model.scheduler.config.get("num_train_timesteps", 1000))
        bad = [t for t in cfg.timesteps if not 0 <= t < n_train]
        if bad:  # the UNet would be told t while the images are noised as at another step
            raise ValueError(f"timesteps {bad} are outside the scheduler's training range 0..{n_train - 1} "
                             f"({type(model.scheduler).__name__}): use timesteps in that range")
        if model.dtype != DTYPES[cfg.dtype]:
            model = as_dtype(model, DTYPES[cfg.dtype])
        self.model = model
        #: values, x_t and targets live in this dtype; the UNet runs in the model's (possibly lower) precision
        self.dtype = diffusion.accumulation_dtype(model.dtype)
        self.concept = resolve(model, concept, n=cfg.n_images, seed=cfg.seed)
        #: The image judge (classifier objective only): ``judge`` (a Judge or a spec) overrides ``cfg.judge``.
        self.judge = None
        if cfg.kind == "classifier":
            self.judge = load_judge(cfg.judge if judge is None else judge, model=model)
            if self.judge.name != cfg.judge:  # the config names the judge used, so caches and metadata see it
                self.config = cfg = replace(cfg, judge=self.judge.name)
            self.judge.check(self.concept)  # a concept the judge cannot score fails here, before any generation
        if len(self.concept.target_prompts) > cfg.n_images:
            warnings.warn(
                f"concept {self.concept.name!r} has {len(self.concept.target_prompts)} prompts but the evaluation set "
                f"has {cfg.n_images} images, so only the first {cfg.n_images} prompts are used; set "
                f"ObjectiveConfig(n_images={len(self.concept.target_prompts)}) to use them all", UserWarning, stacklevel=2)
        # Image i is generated from prompt i mod k (k prompts), each image from its own noise.
        self.prompt_index = [i % len(self.concept.target_prompts) for i in range(cfg.n_images)]
        #: Replay the UNet upstream of a batch's earliest ablation (or causal tracing's restoration) instead of
        #: running it (:mod:`interp.core.prefix`); equal to running it up to the rounding of batch sizes. True: where
        #: that saves FLOPs (see :meth:`replay_prefix`); "always"; False only to measure what it saves.
        self.replay_prefix = True
        #: Bytes the replay cache may hold. A call whose outputs to replay would be more runs full passes instead
        #: (at Stable Diffusion's 64x64 latents a late unit's are gigabytes for an 80-row set: see the README).
        self.replay_budget = REPLAY_BUDGET
        self._replayed: dict = {}  # module path -> its intact output over the whole evaluation set
        self._replay_context = None  # the target context those outputs were computed with (None: the objective's)
        self._build()
        if cfg.kind != "classifier":  # the FLOP shares and output sizes replay decisions read, counted now (on a
                                                                       # later call a caller may be measuring
            module_flops(self.model)
            module_bytes(self.model)
            skippable(self.model)

    @property
    def replay_prefix(self) -> bool | str:
        """True: a call replays the UNet upstream of its batches' earliest interventions when the FLOPs that skips
        exceed those of the intact pass that fills the replay cache (counted even when an earlier call filled it, so the
        choice depends on the call alone); "always": whatever it costs; False: never (full passes)."""
        return self._replay_prefix

    @replay_prefix.setter
    def replay_prefix(self, value) -> None:
        if not (value is True or value is False or value == "always"):
            raise ValueError(f"replay_prefix is {value!r}: use True (where it saves FLOPs), 'always' or False")
        self._replay_prefix = value

    # -- the evaluation set ----------------------------------------------------------------------------------
    def _build(self):
        cfg, model, c = self.config, self.model, self.concept
        dev, dt = model.device, self.dtype
        self.target_prompts = [c.target_prompts[i] for i in self.prompt_index]
        self.anchor_prompts = [c.anchor_prompts[i] for i in self.prompt_index]
        self.target_ids = model.tokenize(model.check_prompts(self.target_prompts), dev)
        self.anchor_ids = model.tokenize(model.check_prompts(self.anchor_prompts), dev)
        with torch.no_grad():
            self.ctx_target = run_text(model, self.target_ids)[0]
            self.ctx_anchor = run_text(model, self.anchor_ids)[0]
        g = cfg.guidance if cfg.guidance is not None else model.default_guidance
        self.rows_per_step = 2 if (g != 1 and model.family.cfg) else 1  # UNet rows of one image in one generation call (guidance: two)
        if cfg.kind == "classifier":
            gen = torch.Generator().manual_seed(cfg.seed)
            self.noise0 = diffusion.initial_noise(model, cfg.n_images, gen, dt, dev)
            self.n_samples = cfg.n_images
            self.branches = 1
            self.rows_per_eval = cfg.n_images * cfg.gen_steps * self.rows_per_step
            sched = diffusion.fresh_scheduler(model.scheduler)
            model.family.set_timesteps(sched, cfg.gen_steps, "cpu", diffusion.latent_shape(model, 1))
            self.unet_calls = len(sched.timesteps)  # calls of one generation (PNDM's differ from gen_steps)
            self.label = c.value
        else:
            # A model kind with its own concepts may supply the images they describe (the concept world's renders).
            x0 = None if model.world is None else model.world.evaluation_images(c, cfg.n_images, dev, dt)
            if x0 is not None:  # supplied images are pixels: a latent model (with a VAE) denoises their latents
                x0 = diffusion.encode(x0, model.vae)
            else:
                per_call = max(1, cfg.max_batch // self.rows_per_step)  # images per call within max_batch rows
                n = len(self.target_prompts)
                # the noise generate draws for all n at once, so that calls within max_batch start where one would
                noise = diffusion.initial_noise(model, n, torch.Generator().manual_seed(cfg.seed),
                                                diffusion.accumulation_dtype(model.dtype), model.device)
                with torch.no_grad():
                    x0 = torch.cat([generate(model, self.target_prompts[s : s + per_call], seed=cfg.seed,
                                             steps=cfg.gen_steps, guidance=cfg.guidance, decode=False,
                                             latents=noise[s : s + per_call], noise_ids=range(s, min(s + per_call, n)))
                                    for s in range(0, n, per_call)])
            x0 = x0.to(dt)
            n_t = len(cfg.timesteps)
            gen = torch.Generator().manual_seed(cfg.seed + 1)
            self.image_index = torch.arange(cfg.n_images).repeat_interleave(n_t)
            self.t = torch.tensor(cfg.timesteps * cfg.n_images, device=dev)
            # Drawn once in float32 and cast: float32 and float64 evaluation sets differ only by rounding.
            self.noise = diffusion.randn((cfg.n_images * n_t, *x0.shape[1:]), gen, dt, dev)
            # Forward noising and the prediction target follow the training schedule, whatever sampler ships.
            self.x_t = diffusion.add_noise(model.scheduler, x0[self.image_index], self.noise, self.t)
            self.target = diffusion.denoising_target(model.scheduler, x0[self.image_index], self.noise, self.t)
            self.n_samples = len(self.t)
            shared = cfg.kind == "erase" and cfg.anchor == "shared"
            self.branches = 2 if shared else 1
            self.rows_per_eval = self.n_samples * self.branches
            if cfg.kind == "erase" and cfg.anchor == "frozen":
                self._intact_anchor()
        with torch.no_grad():
            self.intact = self.values()[0]

    # -- evaluation ------------------------------------------------------------------------------------------
    def values(self, plan: Plan | None = None, mult: torch.Tensor | None = None, means=None,
               target_context: torch.Tensor | None = None, unet_patches=None,
               samples: torch.Tensor | None = None, recompute_text: bool = False,
               record: dict | None = None, intervene_anchor: bool = True) -> torch.Tensor:
        """J per mask row and sample, ``(R, S)``; ``R = 1`` without masks. Chunks rows to ``max_batch``: mask rows,
        and the samples of one mask row when its evaluation set alone is more than ``max_batch`` UNet rows.

        The one place J is computed: every method, causal tracing included, calls it.
        ``target_context`` replaces the target prompts' text states: ``(P, L, D)`` for every row, or ``(R * P, L, D)``
        one block of ``P = n_images`` per row (causal tracing's corrupted and restored runs; then ``R`` may come
        from it). ``unet_patches(step, rows)`` gives the UNet patches of a denoising step (causal tracing's clean
        states) for the target-branch rows ``rows``, indices ``mask_row * n_samples + sample``: a call runs the rows
        that fit in ``max_batch`` and asks for theirs. ``intervene_anchor=False`` keeps the erase objective's anchor
        branch at the intact model (the interventions, patches and contexts act on the target branch only), as
        causal tracing needs.
        ``samples`` restricts the evaluation set to those sample indices (CAD's per-group gradients);
        ``recompute_text`` runs the text encoder inside the call (so gradients reach its weights).
        ``record``: a dict whose keys are module paths; their outputs (rows as in the batch: mask row, branch,
        sample) are stored in it (one chunk only; use with a single mask row).
        """
        if mult is not None and plan is None:
            raise ValueError("multipliers need a compiled plan")
        if mult is not None and plan is not None and mult.shape[-1] != len(plan.components):
            raise ValueError(f"multipliers have {mult.shape[-1]} columns for {len(plan.components)} components")
        P = self.config.n_images
        R = 1 if mult is None else mult.shape[0]
        per_row_context = target_context is not None and target_context.shape[0] != P
        if per_row_context:
            if target_context.shape[0] % P or (mult is not None and target_context.shape[0] != R * P):
                raise ValueError(f"target_context has {target_context.shape[0]} rows: give {P} (one per image) or "
                                 f"{P} per mask row")
            R = target_context.shape[0] // P
        S = self.n_samples if samples is None else len(samples)
        per_sample = self.branches if self.config.kind != "classifier" else 2
        if S > 1 and S * per_sample > self.config.max_batch and record is None:
            # One mask row's evaluation set is more than a pass (Stable Diffusion's default set is 80 UNet rows):
            # split it into groups of samples, whose rows are independent, so max_batch bounds every pass's memory.
            every = torch.arange(self.n_samples) if samples is None else torch.as_tensor(samples)
            per_pass = max(1, self.config.max_batch // per_sample)
            B = self.branches if intervene_anchor and self.config.kind != "classifier" else 1
            return torch.cat([
                self.values(plan, mult, _sample_rows(means, pos, S, B), target_context, unet_patches, every[pos],
                            recompute_text, None, intervene_anchor)
                for pos in torch.arange(S).split(per_pass)], dim=1)
        per_row = S * per_sample
        chunk = max(1, self.config.max_batch // per_row)
        if record is not None and R > chunk:
            raise ValueError("record works on one chunk of mask rows; pass fewer rows")
        if record is not None and any(is_text_part(k.split(".", 1)[0]) for k in record):
            recompute_text = True
        replay = self._replayable(plan, mult, recompute_text, target_context, unet_patches, record)
        if replay:  # rows that start at the same point run together (interp.core.prefix), where that saves FLOPs
            # Replayed rows share one target context (or the objective's own): its one block serves any rows.
            shared = self._shared_context(target_context)
            groups = self._replay_groups(plan, mult, chunk) or [torch.arange(R)]
            subs = [rows[s : s + chunk] for rows in groups for s in range(0, len(rows), chunk)]
            fronts = [frontier(self.model, earliest_active_event(self.model, plan, mult[sub]) or 0) for sub in subs]
            need = list(dict.fromkeys(p for f in fronts for p in f))
            unet_rows = S * (self.branches if intervene_anchor else 1)  # per mask row
            replay = self._replay_pays(fronts, [len(sub) * unet_rows for sub in subs])
        if replay:
            self._fill_replay(need, shared)  # one pass for all chunks
            J = torch.empty(R, S, dtype=self.dtype, device=self.x_t.device)
            for sub in subs:
                J[sub] = self._chunk(plan, mult[sub], means, shared, None, samples, False, None, intervene_anchor,
                                     replay=True)
        else:
            outs = []
            sel = torch.arange(self.n_samples) if samples is None else torch.as_tensor(samples)
            for s in range(0, R, chunk):
                ctx = target_context[s * P : (s + chunk) * P] if per_row_context else target_context
                patches = None if unet_patches is None else _patch_rows(unet_patches, range(s, min(s + chunk, R)),
                                                                        sel, self.n_samples)
                outs.append(self._chunk(plan, None if mult is None else mult[s : s + chunk], means, ctx, patches,
                                        samples, recompute_text, record, intervene_anchor))
            J = torch.cat(outs)
        if not torch.isfinite(J).all():
            raise NonFiniteObjectiveError(
                f"objective {self.config.kind!r} of concept {self.concept.name!r} is not finite "
                f"({int((~torch.isfinite(J)).sum())} of {J.numel()} values): check the model's weights and dtype "
                f"(float16 overflows; use float32 or float64)"
            )
        return J

    def target_contexts(self, target_context: torch.Tensor | None, sel: torch.Tensor, r: int) -> torch.Tensor:
        """Target-branch text states for ``r`` row blocks of the samples ``sel``: ``(r * len(sel), L, D)``."""
        per_image = self.image_index[sel] if self.config.kind != "classifier" else sel
        if target_context is None:
            return self.ctx_target[per_image].repeat(r, 1, 1)
        P = self.config.n_images
        if target_context.shape[0] == P:
            return target_context[per_image].repeat(r, 1, 1)
        blocks = target_context.reshape(-1, P, *target_context.shape[1:])  # (r, P, L, D)
        return blocks[:, per_image].reshape(-1, *target_context.shape[1:])

    def warm(self) -> "Objective":
        """Compute now the intact states J caches on first use (the anchor branch's prediction), so that a copy of
        this objective in another process (a Ray worker) counts only the passes of the work it is sent."""
        if self.config.kind != "classifier":
            self._intact_anchor()
        return self

    def _intact_anchor(self) -> torch.Tensor:
        """The anchor branch's prediction of the intact model (frozen anchor, or ``intervene_anchor=False``)."""
        if getattr(self, "eps_anchor", None) is None:
            with torch.no_grad():
                self.eps_anchor = run_unet_in_passes(self.model, self.x_t, self.t, self.ctx_anchor[self.image_index],
                                                     self.config.max_batch)[0].to(self.dtype)
        return self.eps_anchor

    def _chunk(self, plan, mult, means, target_context, unet_patches, samples=None, recompute_text=False,
               record=None, intervene_anchor: bool = True, replay: bool = False) -> torch.Tensor:
        model, cfg = self.model, self.config
        sel = torch.arange(self.n_samples) if samples is None else torch.as_tensor(samples)
        S = len(sel)
        r = 1 if mult is None else mult.shape[0]
        if mult is None and target_context is not None and target_context.shape[0] != cfg.n_images:
            r = target_context.shape[0] // cfg.n_images
        if cfg.kind == "classifier":
            prompts = [self.target_prompts[i] for i in sel.tolist()] * r
            rows = None if mult is None else mult.repeat_interleave(S, 0)
            ctx = None if target_context is None else self.target_contexts(target_context, sel, r)
            checkpoint = torch.is_grad_enabled() and checkpoints_generation(
                len(prompts) * self.rows_per_step, self.unet_calls, cfg.max_batch)
            images = generate(model, prompts, seed=cfg.seed, steps=cfg.gen_steps, guidance=cfg.guidance, plan=plan,
                              mult=rows, means=means, context=ctx, latents=self.noise0[sel].repeat(r, 1, 1, 1),
                              unet_patches=unet_patches, checkpoint=checkpoint, max_rows=cfg.max_batch,
                              noise_ids=sel.tolist() * r, concept=self.concept)
            p = self.judge.probability(images, self.concept)
            return p.to(self.dtype).reshape(r, S)  # in the objective's dtype, whatever the judge computes in
        # With intervene_anchor=False the anchor branch is not run here: it is the intact model's (cached).
        B = self.branches if intervene_anchor else 1
        idx = self.image_index[sel]
        has_text = (plan is not None and plan.text) or recompute_text
        if has_text:
            ids = torch.cat([self.target_ids[idx], self.anchor_ids[idx]][:B])
            text_rows = None if mult is None else mult.repeat_interleave(B * S, 0)
            tpaths = [k for k in (record or {}) if is_text_part(k.split(".", 1)[0])]
            ctx, saved = run_text(model, ids.repeat(r, 1), plan, text_rows, means, saves=tpaths)
            record.update(saved) if record is not None else None
        else:
            tctx = self.target_contexts(target_context, sel, r).reshape(r, S, *self.ctx_target.shape[1:])
            if B == 2:
                actx = self.ctx_anchor[idx][None].expand(r, -1, -1, -1)
                tctx = torch.stack([tctx, actx], 1)  # (r, branch, S, L, D)
            ctx = tctx.reshape(-1, *self.ctx_target.shape[1:])
        x = self.x_t[sel].repeat(r * B, 1, 1, 1)
        t = self.t[sel].repeat(r * B)
        rows = None if mult is None else mult.repeat_interleave(B * S, 0)
        patches = unet_patches(0) if unet_patches is not None else None
        upaths = [k for k in (record or {}) if not is_text_part(k.split(".", 1)[0])]
        skips = None
        if replay:
            skips, plan = self._replay(plan, mult, sel, r, B, self._shared_context(target_context))
        extra = {}
        if plan is not None and plan.has_tokens:  # the target branch's rows hold the concept; the anchor's do not
            per = torch.cat([idx.cpu(), torch.full((S,), -1, dtype=torch.long)][:B])
            extra["tokens"] = self.token_binding().rows(per.repeat(r))
        eps, saved = run_unet(model, x, t, ctx, plan, rows, means, patches, saves=upaths, skips=skips, **extra)
        if record is not None:
            record.update(saved)
        eps = eps.to(self.dtype).reshape(r, B, S, *eps.shape[1:])
        dims = tuple(range(2, eps.dim() - 1))
        if cfg.kind == "erase":
            anchor = eps[:, 1] if B == 2 else self._intact_anchor()[sel][None]
            return (eps[:, 0] - anchor).pow(2).mean(dim=dims)
        return -(eps[:, 0] - self.target[sel][None]).pow(2).mean(dim=dims)

    def token_binding(self):
        """The concept's token positions in the target prompts (one per image) and the anchors' keys and values
        there (:func:`interp.core.tokens.bind`), computed on first use: what token-KV components need."""
        if getattr(self, "_tokens", None) is None:
            self._tokens = bind_tokens(self.model, self.concept, self.target_prompts, strict=True)
        return self._tokens

    def _replayable(self, plan, mult, recompute_text, target_context, unet_patches, record) -> bool:
        """Whether a call may replay the UNet upstream of its interventions (:mod:`interp.core.prefix`): multipliers
        only (ablations, or causal tracing's restorations of clean states) — no gradients, nothing in the text
        encoder, no patches or recorded outputs, every row on the same target context (the objective's own, or one
        replaced context such as causal tracing's corrupted one), and a one-step objective (the classifier
        objective's generation loop has no fixed upstream)."""
        return (self.replay_prefix and mult is not None and not mult.requires_grad and self.config.kind != "classifier"
                and not plan.text and not recompute_text and unet_patches is None and record is None
                and self._shared_context(target_context) is not False)

    def _shared_context(self, target_context):
        """The one ``(P, L, D)`` target context all rows of a call run on: None for the objective's own, the block
        when every row block of a replaced context is the same, False when rows differ (nothing to replay)."""
        P = self.config.n_images
        if target_context is None or target_context.shape[0] == P:
            return target_context
        blocks = target_context.reshape(-1, P, *target_context.shape[1:])
        return blocks[0] if bool((blocks == blocks[:1]).all()) else False

    @staticmethod
    def _replay_groups(plan, mult: torch.Tensor, min_rows: int = 1) -> list[torch.Tensor] | None:
        """Mask rows grouped by their earliest intervened UNet site, in execution order (rows that change nothing
        last); a group of fewer than ``min_rows`` rows (one batch) takes in the next groups until it has them, and
        replays from its earliest row's start: a batch of a few rows costs nearly what a full one does, so filling
        it beats replaying a little more. None when one group remains (the plain chunked loop does the same)."""
        sites = plan.denoiser
        if not sites:
            return None
        active = torch.stack([(mult[:, s.columns] != 1).any(1) for s in sites], 1)  # (R, n_sites)
        first = torch.where(active.any(1), active.int().argmax(1), len(sites))
        groups: list[torch.Tensor] = []
        for k in first.unique():  # sorted: execution order
            rows = torch.nonzero(first == k).flatten()
            if groups and len(groups[-1]) < min_rows:
                groups[-1] = torch.cat([groups[-1], rows])
            else:
                groups.append(rows)
        return groups if len(groups) > 1 else None

    def _replay(self, plan, mult, sel, r: int, B: int, context=None) -> tuple[dict | None, Plan]:
        """The intact outputs upstream of the rows' earliest ablation, at the batch rows (mask row, branch, sample)
        of ``sel``, and the plan without the sites before it (every row has multiplier 1 there, and they may lie
        inside replayed modules); ``(None, plan)`` when nothing upstream can be replayed."""

        event = earliest_active_event(self.model, plan, mult)
        paths = () if event is None else frontier(self.model, event)
        if not paths:
            return None, plan
        later = [s for s in plan.denoiser if self.model.events[(s.event, s.path)] >= event]
        plan = plan.with_denoiser(later)
        self._fill_replay(paths, context)
        index = torch.cat([b * self.n_samples + sel for b in range(B)])
        return rows_of({p: self._replayed[p] for p in paths}, index, r), plan

    def _replay_pays(self, fronts, rows: list[int]) -> bool:
        """Whether replaying ``fronts`` for batches of ``rows`` UNet rows saves FLOPs, counting the intact pass that
        fills the cache (:func:`interp.core.prefix.replay_pays`) whether or not an earlier call filled it: the choice,
        and so every value's rounding, is a function of the call alone, the same in a resumed run and on every worker.
        ``replay_prefix="always"`` replays whatever it costs in FLOPs. Never when the outputs to cache are more than
        ``replay_budget`` bytes (from per-module output sizes counted on the meta device: a function of the call
        and the model, like the rest)."""

        need = dict.fromkeys(p for f in fronts for p in f)
        if fill_bytes(self.model, need, self.n_samples * self.branches) > self.replay_budget:
            return False  # the cache would outgrow its budget: full passes, the same values up to rounding
        if self.replay_prefix == "always":
            return True
        return replay_pays(self.model, fronts, rows, self.n_samples * self.branches)

    def _cached_context(self, context) -> bool:
        """Whether the replay cache was filled on the target context ``context`` (None: the objective's own)."""
        cached = self._replay_context
        return context is cached or (context is not None and cached is not None and torch.equal(context, cached))

    def _fill_replay(self, paths, context=None) -> None:
        """Make sure the outputs of ``paths`` over the whole evaluation set, without interventions, on the target
        context ``context`` (None: the objective's own), are cached: one uncounted pass for all that are missing.
        One context is cached at a time (causal tracing works through its noise draws one after another). Past
        ``replay_budget`` bytes, outputs not asked for now are dropped first (what a call asks for fits:
        :meth:`_replay_pays`)."""

        if not self._cached_context(context):
            self._replayed, self._replay_context = {}, context
        missing = [p for p in paths if p not in self._replayed]
        if not missing:
            return
        kept = sum(nbytes(v) for v in self._replayed.values())
        if kept + fill_bytes(self.model, missing, self.n_samples * self.branches) > self.replay_budget:
            self._replayed = {p: v for p, v in self._replayed.items() if p in paths}
        full = self.branches
        target = self.ctx_target if context is None else context
        ctx = torch.cat([target[self.image_index], self.ctx_anchor[self.image_index]][:full])
        self._replayed.update(intact_outputs(self.model, missing, self.x_t.repeat(full, 1, 1, 1), self.t.repeat(full),
                                             ctx, max_rows=self.config.max_batch))

    def release(self) -> None:
        """Free the replay cache (a later call that replays fills it again): a run calls it when it is done with
        this objective's sweeps, so that the caches of several concepts are not held at once."""
        self._replayed, self._replay_context = {}, None

    def mean(self, plan=None, mult=None, means=None) -> torch.Tensor:
        """J averaged over the evaluation set, per mask row."""
        return self.values(plan, mult, means).mean(1)

    def identity(self) -> dict:
        """Everything J's values depend on, for cache keys: the objective and its evaluation set (config and concept),
        the model's weights, the device it runs on (results differ by rounding across devices) and, for the
        classifier objective, the judge's weights. The one place cached results are keyed by what J is."""

        return {"objective": self.config.to_dict(), "concept": asdict(self.concept),
                "model": model_fingerprint(self.model), "device": str(self.model.device),
                "judge": None if self.judge is None else module_digest(self.judge.weights())}

    def describe(self) -> dict:
        """The objective as the columns and metadata a result records: its kind, anchor, samples and config."""
        return {"objective": self.config.kind, "anchor": self.config.anchor, "n_samples": self.n_samples,
                "objective_hash": self.config.hash(), **{f"objective_{k}": v for k, v in self.config.to_dict().items()}}


def as_dtype(model, dtype: torch.dtype):
    """A copy of ``model`` in another dtype (float64 ground truth); the user's model is untouched."""

    parts = {k: copy.deepcopy(getattr(model, k)) for k in ("unet", "vae", "classifier")}
    texts = {p: copy.deepcopy(m) for p, m in model.text_encoders.items()}
    for v in [*parts.values(), *texts.values()]:
        if v is not None:
            torch.nn.Module.to(v, dtype)  # diffusers' own .to() warns about fp32-pinned modules; none here
    sched = model.scheduler.__class__.from_config(model.scheduler.config)
    first = model.encoders[0].part
    copy_ = DiffusionModel(model.name, parts["unet"], texts[first], model.tokenizer, sched, parts["vae"],
                           parts["classifier"], world=model.world, pipeline=model.pipeline,
                           default_guidance=model.default_guidance, source=model.source, family=model.family,
                           text_encoders=texts, tokenizers=model.tokenizers)
    for path, site in model.space.features.items():  # attached SAEs come along (their weights cast where used)
        copy_.space.add_feature_site(path, site.dictionary, copy_.module(path))
    return copy_


def _sample_rows(means: dict | None, pos: torch.Tensor, S: int, B: int) -> dict | None:
    """``means`` for the samples at positions ``pos`` of a call's ``S``: per-row values (causal tracing's clean states,
    one row per branch and sample) are cut to those rows; per-unit means (one row, or no row axis) are kept."""
    if not means:
        return means
    rows = torch.cat([b * S + pos for b in range(B)])
    return {k: v[rows.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == B * S else v
            for k, v in means.items()}


def _patch_rows(unet_patches, mask_rows, sel: torch.Tensor, n_samples: int):
    """``unet_patches(step, rows)`` bound to the rows one call runs: mask rows ``mask_rows``, samples ``sel``, as
    indices ``mask_row * n_samples + sample`` in the order the call's rows come (mask row, then sample)."""
    idx = (torch.as_tensor(list(mask_rows))[:, None] * n_samples + sel[None].cpu()).flatten()
    return lambda step: unet_patches(step, idx)


def checkpoints_generation(rows_per_call: int, unet_calls: int, max_batch: int) -> bool:
    """Whether a gradient through generation (the classifier objective) re-runs each UNet call in its backward pass
    instead of keeping the activations of every call: when those would be more than ``max_batch`` UNet rows. A
    gradient then holds one call's activations (plus every step's latents), at the price of one more forward."""
    return rows_per_call * unet_calls > max_batch


def grad_samples_per_pass(obj: Objective, masks: int = 1) -> int:
    """Evaluation samples per backward pass of :func:`mean_gradient` for ``masks`` mask rows: as many as keep a pass
    within ``max_batch`` UNet rows (at least one). Through generation (classifier objective) a pass holds every
    call's activations, ``unet_calls`` times a call's rows, while that fits in ``max_batch``; beyond, its calls are
    re-run in the backward pass (:func:`checkpoints_generation`) and the bound is on one call's rows."""
    if obj.config.kind == "classifier":
        per_call = masks * obj.rows_per_step
        if not checkpoints_generation(per_call, obj.unet_calls, obj.config.max_batch):
            return max(1, obj.config.max_batch // (per_call * obj.unet_calls))
        return max(1, obj.config.max_batch // per_call)
    return max(1, obj.config.max_batch // (masks * obj.branches))


def _sum_of_means(J: torch.Tensor) -> torch.Tensor:
    return J.mean(1).sum()


def masks_per_grad_pass(masks: int, rows_per_mask: int, max_batch: int) -> int:
    """Mask rows per backward pass of :func:`mean_gradient`: all ``masks``, unless one sample of each (``rows_per_mask``
    UNet rows in a call) is already more than ``max_batch`` (4 masks x 2 erase branches = 8 rows: a GPU at Stable
    Diffusion's size may hold fewer), then as many as fit (at least one). Shared with :mod:`interp.studies.plan`."""
    return masks if masks * rows_per_mask <= max_batch else max(1, max_batch // rows_per_mask)


def grad_masks_per_pass(obj: Objective, masks: int) -> int:
    """:func:`masks_per_grad_pass` for ``obj``'s rows per mask and sample in a call."""
    per_mask = obj.rows_per_step if obj.config.kind == "classifier" else obj.branches
    return masks_per_grad_pass(masks, per_mask, obj.config.max_batch)


def mean_gradient(obj: Objective, targets: list[torch.Tensor], samples: torch.Tensor | None = None, masks: int = 1,
                  reduce=_sum_of_means, **values_kwargs) -> list[torch.Tensor]:
    """``autograd.grad(reduce(obj.values(..., samples=samples)), targets)`` — the gradient of J's mean over the
    samples, summed over ``masks`` mask rows — in backward passes of at most ``max_batch`` UNet rows each.

    A forward pass is chunked to ``max_batch`` rows by :meth:`Objective.values`, but a gradient needs the graph of
    every row until the backward pass: over a whole evaluation set (Stable Diffusion's default is 80 UNet rows per
    mask at 64x64 latents) that does not fit on a GPU. So a set larger than one pass is split into groups of
    samples (:func:`grad_samples_per_pass`), each group's mean gradient taken and freed before the next, and the
    groups summed weighted by their share of samples: the same gradient up to rounding, in memory bounded by
    ``max_batch`` (or ``masks`` x branches rows, if larger). A set that fits runs as one pass, exactly as before.
    When one sample of every mask row is already more than ``max_batch`` rows, the mask rows (``mult``), which are
    independent, are split into groups too (:func:`grad_masks_per_pass`) and their gradients summed, as the default
    ``reduce`` (a sum over mask rows) allows. Gradients of recorded activations (``record=``) keep their batch
    layout only in one pass: not split. A target that J does not depend on gets a zero gradient."""
    mult = values_kwargs.get("mult")
    step = grad_masks_per_pass(obj, masks)
    if (step < masks and mult is not None and reduce is _sum_of_means and values_kwargs.get("record") is None
            and values_kwargs.get("target_context") is None
            and (not mult.requires_grad or any(t is mult for t in targets))):
        grads = [torch.zeros_like(t) for t in targets]
        for rows in torch.arange(masks).split(step):
            # a leaf of its own: a slice of ``mult`` would be one graph node shared by the groups' backward passes
            sub = mult[rows].detach().requires_grad_(mult.requires_grad)
            part = mean_gradient(obj, [sub if t is mult else t for t in targets], samples, len(rows), reduce,
                                 **{**values_kwargs, "mult": sub})
            for i, t in enumerate(targets):
                if t is mult:
                    grads[i][rows] += part[i]
                else:
                    grads[i] += part[i]
        return grads
    every = torch.arange(obj.n_samples) if samples is None else torch.as_tensor(samples)
    per_pass = grad_samples_per_pass(obj, masks)
    if len(every) <= per_pass or values_kwargs.get("record") is not None:
        grads = torch.autograd.grad(reduce(obj.values(samples=samples, **values_kwargs)), targets, allow_unused=True)
    else:
        grads = [None] * len(targets)
        for group in every.split(per_pass):
            J = obj.values(samples=group, **values_kwargs).mean(1).sum() * (len(group) / len(every))
            for i, g in enumerate(torch.autograd.grad(J, targets, allow_unused=True)):
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i] + g
    return [torch.zeros_like(t) if g is None else g for t, g in zip(targets, grads)]  # unused: J does not move


def gradients(obj: Objective, params: dict[str, torch.nn.Parameter] | None = None,
              activations: list[str] | None = None) -> dict[str, torch.Tensor]:
    """dJ/d(parameter) and dJ/d(activation) of the mean objective, through the same nnsight layer.

    ``activations`` are module paths (``"unet.mid_block...ff.net.2"``, ``"text_encoder.encoder.layers.0"``); their
    gradients have the batch layout of the evaluation (branch, sample). Gradients are in the objective's dtype
    (float32, or float64 with ``ObjectiveConfig(dtype="float64")``); weights are left as they were.
    """

    params = dict(params or {})
    record = {p: None for p in (activations or [])}
    for p in record:
        obj.model.space.parse(p)  # a clear error for an unknown path
    text = any(is_text_part(n.split(".", 1)[0]) for n in params)
    # Activations only join the autograd graph if something upstream requires grad: let every weight do so for
    # this call (restored afterwards); autograd.grad then computes only what was asked.
    every = [p for _, p in obj.model.parameters()] if record else list(params.values())
    with parameters_requiring_grad(every), torch.enable_grad():
        if record:
            J = obj.values(record=record, recompute_text=text).mean()
            targets = list(params.values()) + [record[p] for p in record]
            grads = torch.autograd.grad(J, targets, allow_unused=True)
        else:
            targets = list(params.values())
            grads = mean_gradient(obj, targets, reduce=lambda J: J.mean(), recompute_text=text)
    names = list(params) + list(record)
    return {n: (torch.zeros_like(t) if g is None else g) for n, t, g in zip(names, targets, grads)}


def reference_means(obj: Objective, plan: Plan, branch: str = "target") -> dict[str, torch.Tensor]:
    """Per-unit means of ``plan``'s sites over the objective's own evaluation inputs (for mean-ablation).

    ``branch="anchor"`` takes them over the anchor prompts instead (the concept word left out or replaced): a
    concept-free reference, which an erasure by mean-ablation needs (over the target prompts, a unit that carries
    the concept has the concept's value as its mean, and replacing it by that erases nothing)."""

    if obj.config.kind == "classifier":
        raise ValueError("mean-ablation needs a denoising objective's evaluation set (erase or amplify)")
    if branch not in ("target", "anchor"):
        raise ValueError(f"branch must be 'target' or 'anchor', got {branch!r}")
    idx = obj.image_index
    ids = obj.target_ids if branch == "target" else obj.anchor_ids
    return unit_means(obj.model, plan, ids[idx], obj.x_t, obj.t, max_rows=obj.config.max_batch)
