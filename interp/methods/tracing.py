"""Causal tracing (Basu et al., "Localizing and Editing Knowledge in Text-to-Image Generative Models", ICLR 2024,
after ROME's causal mediation analysis, Meng et al. 2022).

Corrupt the concept's subject tokens (Gaussian noise of ``noise_scale`` x the standard deviation of the token
embeddings, ``n_noise`` draws, as ROME), then restore the clean state of one component at a time and measure how
much of the concept comes back: ``score = (J_restored - J_corrupted) / (J_clean - J_corrupted)``, the fraction of the
clean-vs-corrupted difference that the component's clean state recovers (1 = fully restores the concept). With
the erase or amplify objective J is the single-step denoising objective at every timestep of the evaluation set;
with the ``classifier`` objective it is the image judge's probability of the concept (the concept classifier, or
CLIP zero-shot: :mod:`interp.core.judges`) on images generated end to end, with the state restored at every denoising
step.

Besides one score per component (restored at all timesteps and token positions), the method makes two maps, its
own frame (``maps(...)``, :data:`interp.core.results.MAP_COLUMNS`): UNet layers x timestep (axis ``timestep``; the
position is the training-schedule timestep of the evaluation sample, or the denoising step index for the classifier
objective) and text-encoder layers x token position (axis ``token``, counted relative to the last subject token: 0
is that token, -1 the one before, 1 the one after). On Stable Diffusion's CLIP text encoder the paper finds a single causal state: layer 0 at the last subject
token.

The method is only as good as its corruption: restored fractions divide by ``J_clean - J_corrupted``, which means
"the concept" only when every noise draw removes part of it. :func:`corruption_check` records, per draw, the share of
J removed (in the run's metadata, ``corruption_removed`` and ``corruption_valid``), and a run whose corruption
raises J or barely moves it warns; the comparison tables and report flag such concepts
(:func:`interp.report.evaluation.corruption_table`).

Scope: components at layer or neuron granularity, and SAE features (:mod:`interp.core.features`): restoring a
feature puts its clean activation back in the corrupted run, ``h + (f_i(h_clean) - f_i(h)) W_dec[i]``, the rest of the
site's output (other features, the reconstruction error) staying corrupted; on the one-step objectives only, not
through generation. Not heads (restoring a head's state needs the input of the output projection; not done here). The restored state of a component is its clean value on the same sample; the scores'
standard error is over noise draws.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from interp.core import diffusion
from interp.core.components import ComponentSet, is_text_part
from interp.core.engine import sweep
from interp.core.executors import Job
from interp.core.generation import generate
from interp.core.interventions import (
    Patch,
    compile_plan,
    run_text,
    run_unet_in_passes,
    stream_key,
)
from interp.core.objectives import Objective, ObjectiveConfig
from interp.methods.base import Capabilities, Map, Method, MethodConfig, Scores, option, register, stderr_over


@dataclass(frozen=True)
class TracingConfig(MethodConfig):
    """Causal tracing's options: ``noise_scale`` (corruption noise in standard deviations of the token embeddings,
    ROME's 3), ``n_noise`` (noise draws; scores' standard errors are over them), ``maps`` (also make the layer x
    timestep and layer x token maps), ``chunk`` (restorations per cached chunk)."""

    noise_scale: float = 3.0
    n_noise: int = option(2, "causal tracing: noise draws per corrupted run", flag="noise")
    maps: bool = True
    chunk: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.noise_scale < 0 or self.n_noise < 1:
            raise ValueError("noise_scale must be >= 0 and n_noise >= 1")


def embedding_path(model, part: str | None = None) -> str:
    """The token-embedding module of a text encoder (default: the first), by address."""
    part = part or model.encoders[0].part
    enc = model.text_encoders[part]
    emb = enc.get_input_embeddings()
    # T5 ties ``shared`` and ``encoder.embed_tokens`` (one weight): the one its forward calls is the one to patch
    for n, m in enc.named_modules(remove_duplicate=False):
        if (m is emb or getattr(m, "weight", None) is emb.weight) and ("out", f"{part}.{n}") in model.events:
            return f"{part}.{n}"
    raise RuntimeError(f"the token embedding of {part} is not among the modules its forward pass calls")


def subject_positions(model, obj, part: str | None = None) -> list[list[int]]:
    """Token positions of the concept's subject in every target prompt (all its tokens; the last one is the 'last
    subject token'), for one text encoder's tokenizer (default: the first). A SentencePiece tokenizer (T5) writes a
    word differently at the start of a text and after a space: the subject is looked up as it reads mid-prompt."""
    part = part or model.encoders[0].part
    tok = model.tokenizers[part]
    words = obj.concept.value or obj.concept.name
    forms = [tok(words, add_special_tokens=False).input_ids, tok(" " + words, add_special_tokens=False).input_ids]
    out = []
    for i, ids in enumerate(model.split_ids(obj.target_ids)[part].tolist()):
        hits = [(p, len(sub)) for sub in forms if sub for p in range(len(ids) - len(sub) + 1) if ids[p : p + len(sub)] == sub]
        if not hits:
            raise ValueError(f"the subject {words!r} does not occur in target prompt {obj.target_prompts[i]!r} as "
                             f"{part}'s tokenizer reads it")
        p, n = max(hits)
        out.append(list(range(p, p + n)))
    return out


def end_of_text_offsets(model, obj, subj, part: str | None = None) -> list[int]:
    """Per target prompt, the end-of-text token's position relative to the last subject token (from the attention
    mask: the last attended position; padding follows it)."""
    part = part or model.encoders[0].part
    length = model.split_ids(obj.target_ids)[part].shape[1]
    mask = model.tokenizers[part](list(obj.target_prompts), padding="max_length", max_length=length,
                                  truncation=True).attention_mask
    return [int(sum(row)) - 1 - pos[-1] for row, pos in zip(mask, subj)]


class _Tracer:
    """The clean, corrupted and restored runs of one objective."""

    def __init__(self, obj, cfg: TracingConfig):
        self.obj, self.cfg, self.model = obj, cfg, obj.model
        m = self.model
        #: every text encoder's subject tokens are corrupted (a concept read by one encoder alone is not removed)
        self.subj_by = {e.part: subject_positions(m, obj, e.part) for e in m.encoders}
        self.subj = self.subj_by[m.encoders[0].part]
        ids = m.split_ids(obj.target_ids)
        gen = torch.Generator().manual_seed(cfg.seed + 12345)
        self.parts = {}
        for e in m.encoders:
            P, L = ids[e.part].shape
            with torch.no_grad():
                emb = m.text_encoders[e.part].get_input_embeddings()
                clean = emb(ids[e.part])
                sd = emb.weight.std()
            mask = torch.zeros(P, L, 1, dtype=torch.bool)
            for i, pos in enumerate(self.subj_by[e.part]):
                mask[i, pos] = True
            noises = [diffusion.randn(clean.shape, gen, clean.dtype, clean.device) * sd * cfg.noise_scale
                      for _ in range(cfg.n_noise)]
            self.parts[e.part] = (embedding_path(m, e.part), clean, mask, noises)
        self.kind = obj.config.kind

    def corruption(self, k: int, rows: int) -> dict[str, Patch]:
        """The embedding patches of noise draw ``k`` for ``rows`` repetitions of the prompts (one per encoder)."""
        return {path: Patch((clean + noises[k]).repeat(rows, 1, 1), mask.repeat(rows, 1, 1))
                for path, clean, mask, noises in self.parts.values()}

    def J(self, ctx_prompts: torch.Tensor, r: int, unet_patches=None, plan=None, mult=None, means=None) -> torch.Tensor:
        """J for ``r`` row blocks of target contexts ``ctx_prompts`` (r * P, L, D): the objective's own J, with the
        anchor branch at the intact model (only the target prompt is corrupted and restored)."""
        if ctx_prompts.shape[0] != r * self.obj.config.n_images:
            raise ValueError(f"{ctx_prompts.shape[0]} contexts for {r} row blocks")
        return self.obj.values(plan, mult, means, target_context=ctx_prompts, unet_patches=unet_patches,
                               intervene_anchor=False)

    def text(self, ids_rows, patches, plan=None, mult=None, means=None):
        return run_text(self.model, ids_rows, plan, mult, means, patches)


def _restore_setup(obj, components, config, part, k, clean, ctx_corr, j_corr, j_clean) -> dict:
    """A restoration sweep's state: the tracer (its noise draws are a pure function of the config) and the plan."""
    comps = ComponentSet([obj.model.space.parse(a) for a in components])
    return {"tr": _Tracer(obj, config), "plan": compile_plan(obj.model, comps), "n": len(comps), "part": part, "k": k,
            "clean": clean, "ctx_corr": ctx_corr, "j_corr": j_corr, "j_clean": j_clean}


def _restore_run(state, start, stop) -> dict[str, torch.Tensor]:
    """Restored fractions of components ``start:stop``: each one's clean state restored alone in the corrupted run."""
    tr, plan, clean, k = state["tr"], state["plan"], state["clean"], state["k"]
    obj, r = tr.obj, stop - start
    M = torch.ones(r, state["n"], dtype=obj.dtype)
    M[torch.arange(r), torch.arange(start, stop)] = 0  # 0 = take the clean value
    with torch.no_grad():
        if state["part"] == "text_encoder":
            ctx = tr.text(obj.target_ids.repeat(r, 1), tr.corruption(k, r), plan, M, clean)[0]
            J = tr.J(ctx, r)
        elif tr.kind == "classifier":
            J = tr.J(state["ctx_corr"].repeat(r, 1, 1), r, unet_patches=_unit_patches(plan, M, clean, obj))
        else:
            J = tr.J(state["ctx_corr"].repeat(r, 1, 1), r, plan=plan, mult=M, means=clean)
    return {"frac": _frac(J, state["j_corr"], state["j_clean"])[:, 0]}


#: A corruption that moves J by less than this fraction of its clean value makes restored fractions unstable.
WEAK_CORRUPTION = 0.02


def corruption_check(j_clean: float, j_corrupted: list[float]) -> dict:
    """Does the corruption remove the concept? Per noise draw, the share of the clean J it removes,
    ``(J_clean - J_corrupted) / |J_clean|`` (J's means over the evaluation set, as the run's metadata records them;
    every objective has higher J = more concept). The corruption is *valid* when every draw removes at least :data:`WEAK_CORRUPTION`: a draw that
    raises J (or barely moves it) divides restorations by a gap that is not the concept's, so its restored fractions
    measure something else (Basu et al. and ROME assume the corrupted run has lost the subject)."""
    scale = abs(j_clean) or 1.0
    removed = [(j_clean - j) / scale for j in j_corrupted]
    return {"corruption_removed": removed, "corruption_valid": all(r >= WEAK_CORRUPTION for r in removed)}


def _corruption_message(concept: str, check: dict) -> str:
    removed = check["corruption_removed"]
    moves = ", ".join(f"{0.0 - r:+.0%}" for r in removed)
    draws = "its noise draw" if len(removed) == 1 else f"its {len(removed)} noise draws"
    return (f"causal tracing: corrupting the subject tokens of {concept!r} does not remove the concept (J changed by "
            f"{moves} in {draws}; every draw must lower J by at least {WEAK_CORRUPTION:.0%}), "
            f"so its restored fractions are not restorations of the concept; read them as unreliable, or change "
            f"noise_scale or the prompts")


def _frac(j_rest, j_corr, j_clean, groups=None):
    """Restored fraction per row; with ``groups`` (list of sample index tensors) one column per group."""
    if groups is None:
        groups = [torch.arange(j_rest.shape[1])]
    cols = []
    for g in groups:
        den = j_clean[g].mean() - j_corr[g].mean()
        num = j_rest[:, g].mean(1) - j_corr[g].mean()
        # Below this the corruption changed J by no more than batch-size rounding (e.g. zero noise): every run
        # equals the clean one up to rounding, i.e. restores 100%.
        scale = j_clean[g].abs().mean()
        tol = 1e-5 * scale + torch.finfo(j_clean.dtype).tiny
        if tol < den.abs() < WEAK_CORRUPTION * scale:
            warnings.warn(
                f"causal tracing: a corruption moved J by only {float(den.abs() / scale):.1%} of its clean value, so "
                f"restored fractions (divided by that gap) are unstable; raise noise_scale or n_noise",
                RuntimeWarning, stacklevel=2)
        cols.append(num / den if den.abs() > tol else torch.ones_like(num))
    return torch.stack(cols, 1)


@register
class CausalTracing(Method):
    """Causal tracing (Basu et al., ICLR 2024): the fraction of the concept that restoring one component's clean
    state brings back into a run whose subject tokens are corrupted (this module's docstring has the details)."""

    name = "tracing"
    label = "causal tracing"
    map_score = "fraction of the concept restored"
    default_run = True
    Config = TracingConfig
    capabilities = Capabilities(granularities=("layer", "neuron", "feature"), maps=True, single_changes=True)

    def _scores(self, obj, comps, run):
        cfg, m = self.config, obj.model
        tr = _Tracer(obj, cfg)
        with torch.no_grad():
            j_clean = tr.J(obj.ctx_target, 1)[0]
            ctx_corr = [tr.text(obj.target_ids, tr.corruption(k, 1))[0] for k in range(cfg.n_noise)]
            j_corr = [tr.J(c, 1)[0] for c in ctx_corr]
            check = corruption_check(float(j_clean.mean()), [float(j.mean()) for j in j_corr])
            if not check["corruption_valid"]:
                warnings.warn(_corruption_message(obj.concept.name, check), RuntimeWarning, stacklevel=2)
            scores = self._components(tr, comps, j_clean, j_corr, ctx_corr, run)
            maps = self._maps(tr, j_clean, j_corr, ctx_corr) if cfg.maps else []
        meta = {"j_clean": float(j_clean.mean()), "j_corrupted": [float(j.mean()) for j in j_corr],
                "subject_positions": tr.subj, "noise_scale": cfg.noise_scale,
                "end_of_text_offsets": end_of_text_offsets(m, obj, tr.subj), **check}
        return Scores(scores.mean(1), stderr_over(scores, 1), maps=maps, meta=meta)

    def _components(self, tr, comps, j_clean, j_corr, ctx_corr, run):
        obj, m, cfg = tr.obj, tr.model, self.config
        if tr.kind == "classifier" and "feature" in comps.granularities:
            raise ValueError("causal tracing restores SAE features on the one-step objectives (erase, amplify), not "
                             "through generation: choose --objective erase, or leave tracing out of --methods")
        n = len(comps)
        text_idx = [i for i, c in enumerate(comps) if is_text_part(c.model)]
        unet_idx = [i for i, c in enumerate(comps) if not is_text_part(c.model)]
        out = torch.empty(n, cfg.n_noise, dtype=torch.float64)
        for part, idx in (("text_encoder", text_idx), ("unet", unet_idx)):
            if not idx:
                continue
            sub = ComponentSet([comps[i] for i in idx])
            clean = self._clean_states(tr, compile_plan(m, sub), part)
            for k in range(cfg.n_noise):
                # The restorations as data (the clean states and the corrupted run travel with the job), so any
                # executor can run them: see _restore_setup / _restore_run.
                job = Job("interp.methods.tracing:_restore_setup", "interp.methods.tracing:_restore_run",
                          {"components": sub.addresses, "config": cfg, "part": part, "k": k, "clean": clean,
                           "ctx_corr": ctx_corr[k], "j_corr": j_corr[k], "j_clean": j_clean})
                fracs = sweep(run.entry, obj, job, len(sub), cfg.chunk, f"trace-{part}-{k}", run.progress, run.executor)
                out[idx, k] = torch.cat([f["frac"] for f in fracs]).double()
        return out

    def _clean_states(self, tr, plan, part):
        """Clean values at every site of ``plan`` (per prompt for text, per sample or per step for the UNet)."""
        obj, m = tr.obj, tr.model
        paths = [s.path for s in (plan.text if part == "text_encoder" else plan.denoiser)]
        if part == "text_encoder":  # every text encoder's sites
            return run_text(m, obj.target_ids, saves=[s.path for s in plan.text])[1]
        if tr.kind == "classifier":  # every step's states, recorded in generations within max_batch rows
            cfg, n = obj.config, len(obj.target_prompts)
            per_call = max(1, cfg.max_batch // obj.rows_per_step)
            parts: dict = {}
            with torch.no_grad():
                for s in range(0, n, per_call):
                    rec: dict = {}
                    generate(m, list(obj.target_prompts[s : s + per_call]), seed=cfg.seed, steps=cfg.gen_steps,
                             guidance=cfg.guidance, latents=obj.noise0[s : s + per_call], record=paths,
                             recorded=rec, decode=False, noise_ids=range(s, min(s + per_call, n)))
                    for step, saved in rec.items():
                        for k, v in saved.items():  # kept in host memory: each call moves the rows it needs
                            parts.setdefault(step, {}).setdefault(k, []).append(v.cpu())
            return {step: {k: torch.cat(v) for k, v in saved.items()} for step, saved in parts.items()}
        return run_unet_in_passes(m, obj.x_t, obj.t, obj.ctx_target[obj.image_index], obj.config.max_batch,
                                  saves=paths)[1]

    def _maps(self, tr, j_clean, j_corr, ctx_corr):
        obj, m, cfg = tr.obj, tr.model, self.config
        frames = []
        # UNet layers x timestep: restore one layer's clean output; read each timestep's samples separately.
        layers = m.components("layer", family=[f for f in ("block", "single_block", "resnet") if f in m.space.families()])
        plan = compile_plan(m, layers)
        clean = self._clean_states(tr, plan, "unet")
        r = len(layers)
        M = torch.ones(r, r, dtype=obj.dtype) - torch.eye(r, dtype=obj.dtype)
        if tr.kind == "classifier":
            steps = obj.config.gen_steps
            vals = torch.empty(r, steps, cfg.n_noise, dtype=torch.float64)
            for k in range(cfg.n_noise):
                for s in range(steps):
                    J = tr.J(ctx_corr[k].repeat(r, 1, 1), r, unet_patches=_unit_patches(plan, M, clean, obj, only_step=s))
                    vals[:, s, k] = _frac(J, j_corr[k], j_clean)[:, 0].double()
            labels = list(range(steps))
        else:
            ts = sorted(set(obj.t.tolist()))
            groups = [torch.nonzero(obj.t == t).flatten() for t in ts]
            vals = torch.empty(r, len(ts), cfg.n_noise, dtype=torch.float64)
            for k in range(cfg.n_noise):
                J = tr.J(ctx_corr[k].repeat(r, 1, 1), r, plan=plan, mult=M, means=clean)
                vals[:, :, k] = _frac(J, j_corr[k], j_clean, groups).double()
            labels = ts
        for j, lab in enumerate(labels):
            frames.append(Map(layers, vals[:, j].mean(1).numpy(), stderr_over(vals[:, j], 1).numpy(), "timestep", lab))
        # Text-encoder layers x token position (relative to the last subject token).
        tlayers = m.components("layer", family="text_layer")
        paths = [c.module for c in tlayers]
        clean_t = run_text(m, obj.target_ids, saves=paths)[1]
        P = obj.target_ids.shape[0]
        # Every position of the context counts: the subject, the tokens before it, and the end-of-text and padding
        # positions after it (where Basu et al. look for what the subject passes on). Not found from pad_token_id:
        # CLIP's pad token IS the end-of-text token in SD 1.x. Positions count in each layer's own encoder.
        length = {e.part: e.length for e in m.encoders}
        lasts = {part: [pos[-1] for pos in subj] for part, subj in tr.subj_by.items()}
        offsets = sorted({o for part, last in lasts.items()
                          for o in range(-max(last), max(length[part] - 1 - s for s in last) + 1)})
        table = {}
        for k in range(cfg.n_noise):
            for li, path in enumerate(paths):
                part = path.split(".", 1)[0]
                L, last = length[part], lasts[part]
                lengths = [L] * P
                R = L  # one row block per absolute position
                where = torch.zeros(R, P, L, 1, dtype=torch.bool)
                for p in range(L):
                    where[p, :, p] = True
                patches = tr.corruption(k, R)
                patches[path] = Patch(clean_t[path].repeat(R, 1, 1), where.reshape(R * P, L, 1))
                ctx = tr.text(obj.target_ids.repeat(R, 1), patches)[0]
                J = tr.J(ctx, R)  # (R, S) per absolute position
                if tr.kind == "classifier":
                    per_prompt = J
                else:
                    per_prompt = torch.stack([J[:, obj.image_index == i].mean(1) for i in range(P)], 1)
                    jc = torch.stack([j_clean[obj.image_index == i].mean() for i in range(P)])
                    jk = torch.stack([j_corr[k][obj.image_index == i].mean() for i in range(P)])
                if tr.kind == "classifier":
                    jc, jk = j_clean, j_corr[k]
                for off in offsets:
                    num, den = [], []
                    for i in range(P):
                        p = last[i] + off
                        if 0 <= p < lengths[i]:
                            num.append(per_prompt[p, i] - jk[i])
                            den.append(jc[i] - jk[i])
                    if num:
                        d = torch.stack(den).sum()
                        table.setdefault((li, off), []).append(float(torch.stack(num).sum() / d) if d.abs() > 0 else float("nan"))
        for off in offsets:
            vals_t = np.array([np.mean(table.get((li, off), [np.nan])) for li in range(len(paths))])
            errs = np.array([np.std(table.get((li, off), [np.nan])) / np.sqrt(max(1, len(table.get((li, off), [])) - 0))
                             for li in range(len(paths))])
            if np.isfinite(vals_t).any():
                frames.append(Map(tlayers, np.nan_to_num(vals_t), errs, "token", off))
        return frames

    @classmethod
    def planned_rows(cls, config, comps, shape):
        """UNet rows of a run (see :mod:`interp.studies.plan`), all without gradients: the clean and corrupted runs, one
        restored run per component and noise draw, and the layer x timestep and layer x token maps."""
        from collections import Counter

        k = config.n_noise
        rows = shape.target_j(1) * (1 + k)  # J clean, J corrupted per draw
        if shape.kind == "erase" and shape.anchor != "frozen":
            rows = rows + shape.target_j(1)  # the intact anchor branch, computed once (erase only)
        parts = Counter(c.model for c in comps)
        if parts["unet"]:
            rows = rows + shape.clean_states()
        rows = rows + shape.target_j(len(comps)) * k
        if config.maps:
            per_step = shape.gen_steps if shape.kind == "classifier" else 1  # classifier: one map column per step
            rows = rows + shape.clean_states() + shape.target_j(shape.trace_unet_layers) * (k * per_step)
            rows = rows + shape.target_j(shape.text_length) * (k * shape.trace_text_layers)
        return rows


#: Where :func:`text_restoration` restores a text layer's clean state.
RESTORE_POSITIONS = ("subject", "end_of_text", "all")


def text_restoration(model, concept, objective=None, positions=RESTORE_POSITIONS, noise_scale: float = 3.0,
                     n_noise: int = 2, seed: int = 0) -> pd.DataFrame:
    """Basu et al.'s text-encoder claim, end to end: corrupt the subject tokens' embeddings (as causal tracing does),
    restore ONE text layer's clean output at some positions, generate the images and ask the judge.

    ``objective``: a ``classifier`` :class:`~interp.core.objectives.ObjectiveConfig` (its prompts, initial noises,
    denoising steps and judge); ``positions``: ``subject`` (the last subject token), ``end_of_text`` (from the
    attention mask) and ``all`` (every position: the layer's whole clean output, so the last layer restores the
    clean context exactly). The text encoder is causal: a state restored at position p of layer l reaches the
    positions after p only through layers l+1..; the UNet cross-attends to every position's final state.

    Returns one row per (layer, position) and two reference rows (``clean`` and ``corrupted``, layer -1), with the
    judge's ``concept_rate`` (share of images whose predicted value among the attribute's values is the concept;
    ``p_concept > 0.5`` without an attribute), the mean ``p_concept``, and the restored fractions
    ``(x - corrupted) / (clean - corrupted)`` of both, each the mean over the ``n_noise`` draws (``*_se`` their
    standard errors)."""

    objective = objective or ObjectiveConfig(kind="classifier")
    if objective.kind != "classifier":
        raise ValueError("text_restoration judges generated images: pass a 'classifier' objective")
    bad = [p for p in positions if p not in RESTORE_POSITIONS]
    if bad or not positions:
        raise ValueError(f"positions must be among {RESTORE_POSITIONS}, got {list(positions)}")
    obj = Objective(model, concept, objective)
    tr = _Tracer(obj, TracingConfig(noise_scale=noise_scale, n_noise=n_noise, seed=seed, maps=False))
    ids, P = obj.target_ids, obj.target_ids.shape[0]
    paths = [c.module for c in model.components("layer", family="text_layer")]
    clean = run_text(model, ids, saves=paths)[1]
    where_by, length = {}, {e.part: e.length for e in model.encoders}
    for part, subj in tr.subj_by.items():  # positions in each encoder's own tokens
        last = [pos[-1] for pos in subj]
        eot = [s + o for s, o in zip(last, end_of_text_offsets(model, obj, subj, part))]
        where_by[part] = {"subject": last, "end_of_text": eot}
    c = obj.concept
    values = (c.value or c.name, *c.alternatives) if c.attribute and c.alternatives else None

    per_call = max(1, obj.config.max_batch // obj.rows_per_step)  # images per generation within max_batch rows

    def judged(ctx):
        with torch.no_grad():
            images = torch.cat([
                generate(model, list(obj.target_prompts[s : s + per_call]), seed=objective.seed,
                         steps=objective.gen_steps, guidance=objective.guidance, context=ctx[s : s + per_call],
                         latents=obj.noise0[s : s + per_call], max_rows=obj.config.max_batch,
                         noise_ids=range(s, min(s + per_call, P)))
                for s in range(0, P, per_call)])
            p = obj.judge.probability(images, c).double()
            hit = (obj.judge.predict(images, {c.attribute: values})[c.attribute].argmax(-1) == 0).double() \
                if values else (p > 0.5).double()
        return float(hit.mean()), float(p.mean())

    rate_clean, p_clean = judged(obj.ctx_target)
    rows = []
    for k in range(n_noise):
        ctx_corr = tr.text(ids, tr.corruption(k, 1))[0]
        rate_corr, p_corr = judged(ctx_corr)
        rows.append({"layer": -1, "module": None, "position": "corrupted", "noise": k, "rate": rate_corr,
                     "p": p_corr, "rate_corr": rate_corr, "p_corr": p_corr})
        for li, path in enumerate(paths):
            part = path.split(".", 1)[0]
            L, where = length[part], where_by[part]
            for pos in positions:
                mask = torch.zeros(P, L, 1, dtype=torch.bool)
                if pos == "all":
                    mask[:] = True
                else:
                    mask[torch.arange(P), torch.tensor(where[pos])] = True
                patches = tr.corruption(k, 1)
                patches[path] = Patch(clean[path], mask)
                rate, p = judged(tr.text(ids, patches)[0])
                rows.append({"layer": li, "module": path, "position": pos, "noise": k, "rate": rate, "p": p,
                             "rate_corr": rate_corr, "p_corr": p_corr})
    df = pd.DataFrame(rows)
    with np.errstate(invalid="ignore", divide="ignore"):
        df["restored_rate"] = (df["rate"] - df["rate_corr"]) / (rate_clean - df["rate_corr"])
        df["restored_p"] = (df["p"] - df["p_corr"]) / (p_clean - df["p_corr"])
    g = df.groupby(["layer", "module", "position"], dropna=False, sort=False)
    out = g[["rate", "p", "restored_rate", "restored_p"]].mean()
    se = g[["rate", "restored_rate"]].sem().fillna(0.0).add_suffix("_se")
    out = out.join(se).reset_index().rename(columns={"rate": "concept_rate", "p": "p_concept"})
    ref = pd.DataFrame([{"layer": -1, "module": None, "position": "clean", "concept_rate": rate_clean,
                         "p_concept": p_clean, "restored_rate": 1.0, "restored_p": 1.0, "rate_se": 0.0,
                         "restored_rate_se": 0.0}])
    out = pd.concat([ref, out], ignore_index=True)
    out.insert(0, "concept", c.name)
    out["n_images"], out["n_noise"], out["noise_scale"] = P, n_noise, noise_scale
    return out


def _unit_patches(plan, M, clean_by_step, obj, only_step=None):
    """Per-step patches that restore, for mask row i, the clean value of the units whose multiplier is 0 in
    ``M[i]``: ``fn(step, rows)`` for the rows ``mask_row * n_samples + image`` a generation call runs
    (:meth:`Objective.values`), built for those rows only, so a call's patches hold what its rows need."""
    P = obj.n_samples  # the classifier objective's samples are its images

    def fn(step, rows):
        if only_step is not None and step != only_step:
            return {}
        mrow, img = rows // P, rows % P
        patches = {}
        for s in plan.denoiser:
            for k in range(s.streams):  # a joint block's two streams are restored together
                key = stream_key(s.path, k)
                if key in clean_by_step[step]:  # (SD3's last block has no context stream)
                    patches[key] = _restore_patch(s, clean_by_step[step][key], M, mrow, img)
        return patches

    return fn


def _restore_patch(s, clean, M, mrow, img) -> Patch:
    """The patch of site ``s`` that puts back ``clean`` where mask rows ``mrow`` zero a unit, for images ``img``."""
    h_shape = clean.shape
    keep = torch.ones(len(mrow), s.n_features, dtype=torch.bool)
    if s.whole:
        keep = (M[mrow][:, s.columns[0]] != 0)[:, None].expand(-1, s.n_features)
    else:
        keep[:, s.features] = M[mrow][:, s.columns] != 0
    where = ~keep
    if s.whole:
        where = where[:, :1].reshape(-1, *([1] * (len(h_shape) - 1)))
    elif s.axis == 1:
        where = where.reshape(where.shape[0], s.n_features, *([1] * (len(h_shape) - 2)))
    else:
        where = where.reshape(where.shape[0], *([1] * (len(h_shape) - 2)), s.n_features)
    return Patch(clean[img.to(clean.device)], where)
