"""Unified Concept Editing (Gandikota, Orgad, Belinkov, Materzynska, Bau; WACV 2024, arXiv 2308.14761).

A closed-form edit of the projections through which the denoiser reads the text: the key and value projections
(``to_k``, ``to_v``) of every UNet cross-attention (``attn2``). For the concept's text states ``c_i`` (the text
encoder's outputs at the last token of the concept and every later position, where the UNet reads what the concept
passed on) the edited projection should give what the unedited one gives for the anchor's states ``c*_i`` at
matching positions (``v*_i = W_old c*_i``), while the states ``c_j`` of preserved prompts keep their outputs
(``W_old c_j``). The least-squares solution with a ridge pull towards ``W_old``:

    W = (e sum_i v*_i c_i^T + p sum_j W_old c_j c_j^T + lam W_old) (e sum_i c_i c_i^T + p sum_j c_j c_j^T + lam I)^-1

with ``e`` the erase scale, ``p`` the preserve scale and ``lam`` the ridge (the paper's defaults: ``lam = 0.1``,
``e = 1``). Solved in float64 through a linear solve, never an explicit inverse. Positions are aligned from the
concept's last token (the anchor prompt is shifted by the difference of the two prompts' token counts), as in the
reference implementation and in :mod:`interp.studies.editing.edits`' Diff-QuickFix. The edit is a
:class:`~interp.studies.editing.edits.WeightEdit`: applied inside a context, the weights are restored bitwise on exit.

**Model families** (:mod:`interp.core.families`). The edited projections and their inputs ``c`` are, per family:

======== ===================================================== ==================================================
family   projections                                           inputs ``c``
======== ===================================================== ==================================================
sd       every UNet ``attn2.to_k`` / ``to_v``                  CLIP's states (the UNet's context as it is)
sdxl     every UNet ``attn2.to_k`` / ``to_v``                  both CLIPs' penultimate states, side by side
pixart   every block's ``attn2.to_k`` / ``to_v``               T5's states after ``caption_projection``
sd3      every joint block's ``attn.add_k_proj`` / ``add_v``   the block's context stream, recorded
flux     every double-stream block's ``add_k_proj`` / ``add_v`` the block's context stream, recorded
======== ===================================================== ==================================================

Stable Diffusion 1.x/2.x and SDXL cross-attentions read the text encoders' states unchanged, so ``c`` is
:func:`text_states`' (no denoiser pass). Elsewhere ``c`` is what each projection really sees, recorded with hooks in
one denoiser forward (:func:`projection_inputs`) at the first step of sampling: seeded Gaussian latents at the first
timestep of the model's own :data:`RECORD_STEPS`-step schedule (flow matching: sigma = 1, pure noise), a concept
prompt and its anchor sharing their latents. PixArt's projections all read one tensor (the caption projection, which
neither the latents nor the timestep change); a joint block's context stream depends on the timestep (its
adaptive norm), on the image tokens it attended to and on every earlier block, so the blocks are solved one after
another: block ``b``'s concept and preserved inputs are recorded with the edits of blocks ``< b`` applied, and its
targets are the unedited model's (the anchor's outputs, the preserved prompts' own outputs). The edit is exact at
that step and approximate at the later steps of sampling, where the image stream differs. FLUX's single-stream
blocks are not edited: their ``to_k``/``to_v`` are shared by the image and the text tokens, so rewriting them for
the concept would rewrite the image's attention too; they read the context stream the double-stream blocks leave,
which the edit has already moved towards the anchor's. Readers that see the whole prompt (T5's states; joint
attention, which mixes the tokens) carry the concept before its position too: there the concept's columns are every
position but the subject's tokens before its last, matched to the anchor's; positions a pipeline masks (PixArt's T5
padding) are left out.

Which prompts carry the concept: on the concept world, captions of scenes with the concept and the same captions
without the word (or with ``anchor`` in its place); elsewhere the default templates around the phrase, anchored to
the empty prompt. Preserved prompts: on the concept world, captions of scenes without the concept; elsewhere the
caller's ``preserve`` prompts (none by default).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from interp.core import diffusion
from interp.core.families import FAMILIES, unpack
from interp.core.interventions import run_text, run_unet
from interp.studies.editing.edits import (
    EDIT_SEED,
    WeightEdit,
    WeightUpdate,
    aligned_positions,
    attended_mask,
    preserve_prompts,
    quickfix_prompts,
    reads_whole_prompt,
    subject_forms,
)

UCE_LAMBDA = 0.1
UCE_ERASE_SCALE = 1.0
UCE_PRESERVE_SCALE = 0.1
#: The schedule whose first step the recorded inputs are taken at (generation's default number of steps).
RECORD_STEPS = 20
#: Prompts per denoiser forward when recording inputs.
RECORD_ROWS = 16

#: How each family's denoiser reads the text: "cross" (cross-attention ``attn2.to_k``/``to_v``) or "joint" (the
#: joint blocks' ``attn.add_k_proj``/``add_v_proj`` on the context stream).
READERS = {"sd": "cross", "sdxl": "cross", "pixart": "cross", "sd3": "joint", "flux": "joint"}
#: Families whose cross-attention reads the text encoders' states unchanged (inputs without a denoiser pass).
_STATES_AS_GIVEN = ("sd", "sdxl")


@dataclass(frozen=True, eq=False)
class UCESolution:
    """One projection's solution: ``W (e C C^T + p P P^T + lam I) = e V C^T + p T P^T + lam W0`` (float64), where the
    preserved columns' targets ``T`` are their unedited outputs ``W0 P`` unless given (``P_target``: a joint block
    solved after earlier blocks were edited keeps the outputs its preserved prompts had in the unedited model)."""

    W_star: torch.Tensor  # (out, in)
    W0: torch.Tensor  # (out, in)
    C: torch.Tensor  # (in, N) concept states as columns
    V: torch.Tensor  # (out, N) target outputs as columns
    P: torch.Tensor  # (in, M) preserved states as columns (M may be 0)
    lam: float
    erase_scale: float
    preserve_scale: float
    P_target: torch.Tensor | None = None  # (out, M); None: W0 P

    def _system(self):
        eye = torch.eye(self.C.shape[0], dtype=self.C.dtype)
        PP = self.P @ self.P.T
        A = self.erase_scale * self.C @ self.C.T + self.preserve_scale * PP + self.lam * eye
        if self.P_target is None:
            B = self.erase_scale * self.V @ self.C.T + self.preserve_scale * self.W0 @ PP + self.lam * self.W0
        else:
            B = (self.erase_scale * self.V @ self.C.T + self.preserve_scale * self.P_target @ self.P.T
                 + self.lam * self.W0)
        return A, B

    def residual(self) -> float:
        """Largest absolute violation of the normal equations, relative to the right-hand side's scale."""
        A, B = self._system()
        return float((self.W_star @ A - B).abs().max() / B.abs().max().clamp_min(1e-300))

    def objective(self, W: torch.Tensor) -> float:
        """The least-squares objective the solution minimizes, at weights ``W``:
        ``e |W C - V|^2 + p |W P - T|^2 + lam |W - W0|^2``."""
        W = W.detach().to(torch.float64)
        T = self.W0 @ self.P if self.P_target is None else self.P_target
        return float(self.erase_scale * (W @ self.C - self.V).square().sum()
                     + self.preserve_scale * (W @ self.P - T).square().sum()
                     + self.lam * (W - self.W0).square().sum())


def uce_solve(W0: torch.Tensor, C: torch.Tensor, V: torch.Tensor, P: torch.Tensor | None = None,
              lam: float = UCE_LAMBDA, erase_scale: float = UCE_ERASE_SCALE,
              preserve_scale: float = UCE_PRESERVE_SCALE, P_target: torch.Tensor | None = None) -> UCESolution:
    """UCE's closed form for one projection ``W0`` (out, in); states as columns; float64. ``P_target`` (out, M): the
    outputs the preserved states must keep (default: their unedited outputs ``W0 P``)."""
    if lam <= 0:
        raise ValueError(f"lam must be positive (it keeps the system invertible), got {lam}")
    if erase_scale < 0 or preserve_scale < 0:
        raise ValueError(f"erase_scale and preserve_scale must be >= 0, got {erase_scale}, {preserve_scale}")
    W0, C, V = (x.detach().to(torch.float64) for x in (W0, C, V))
    P = torch.zeros(C.shape[0], 0, dtype=torch.float64) if P is None else P.detach().to(torch.float64)
    if C.shape[0] != W0.shape[1] or V.shape[0] != W0.shape[0] or C.shape[1] != V.shape[1] or P.shape[0] != C.shape[0]:
        raise ValueError(f"shapes do not match: W0 {tuple(W0.shape)}, C {tuple(C.shape)}, V {tuple(V.shape)}, "
                         f"P {tuple(P.shape)}")
    if P_target is not None:
        P_target = P_target.detach().to(torch.float64)
        if P_target.shape != (W0.shape[0], P.shape[1]):
            raise ValueError(f"shapes do not match: P_target {tuple(P_target.shape)} for W0 {tuple(W0.shape)} and "
                             f"P {tuple(P.shape)}")
    sol = UCESolution(torch.empty(0), W0, C, V, P, lam, erase_scale, preserve_scale, P_target)
    A, B = sol._system()
    W_star = torch.linalg.solve(A, B.T).T  # A is symmetric: W A = B  <=>  A W^T = B^T
    return UCESolution(W_star, W0, C, V, P, lam, erase_scale, preserve_scale, P_target)


def text_reader(model, edit: str = "UCE") -> str:
    """How the model's denoiser reads the text (:data:`READERS`); a family without an entry is refused by name."""
    kind = READERS.get(model.family.name)
    if kind is None:
        known = ", ".join(FAMILIES[f].label for f in READERS if f in FAMILIES)
        raise ValueError(f"{edit} does not know through which projections the {model.family.label} denoiser "
                         f"({type(model.denoiser).__name__}) reads the text, so it has nothing to edit; it is "
                         f"implemented for {known}; use the attribution-guided ablations of erasure_curves on this "
                         f"model")
    return kind


def cross_attention_projections(model, with_to_k: bool = True) -> list[str]:
    """Module paths of the projections through which the denoiser reads the text, in execution order: every
    cross-attention's value (and key) projection (Stable Diffusion, SDXL, PixArt), or every joint block's context
    value (and key) projection ``attn.add_v_proj`` (``add_k_proj``) (SD3, FLUX's double-stream blocks)."""
    kind = text_reader(model)
    prefix = re.escape(model.denoiser_part)
    if kind == "cross":
        v, k, what = re.compile(rf"^{prefix}\..*\.attn2\.to_v$"), "to_k", "cross-attention (attn2) projections"
    else:
        v, k, what = (re.compile(rf"^{prefix}\.transformer_blocks\.\d+\.attn\.add_v_proj$"), "add_k_proj",
                      "joint-attention context projections (attn.add_k_proj, add_v_proj)")
    paths = [p for p in model.space.modules if v.match(p)]
    if with_to_k:
        paths += [p.rsplit(".", 1)[0] + "." + k for p in paths]
    if not paths:
        raise ValueError(f"the {model.family.label} {model.denoiser_part} has no {what}: UCE edits those")
    return sorted(paths, key=lambda p: model.events[("in", p)])


#: Another name for :func:`cross_attention_projections` (on SD3 and FLUX they are the context stream's).
context_projections = cross_attention_projections


def token_segments(model) -> list[tuple[tuple[str, ...], int]]:
    """Runs of the denoiser context's token rows: the text encoders whose states fill a run (side by side along the
    features: SDXL's and SD3's two CLIPs, whose tokenizers place every token alike) and the run's first row."""
    fam, parts = model.family.name, model.text_parts
    if fam == "sd3":  # CLIP-L and CLIP-G side by side, then T5's tokens (when the pipeline has T5)
        segs = [(tuple(p for p in parts if p != "text_encoder_3"), 0)]
        if "text_encoder_3" in parts:
            segs.append((("text_encoder_3",), model.encoders[0].length))
        return segs
    if fam == "flux":  # T5's tokens; CLIP gives the pooled embedding only
        return [(("text_encoder_2",), 0)]
    if fam == "sdxl":
        return [(tuple(parts), 0)]
    return [((parts[0],), 0)]


def context_positions(model, concept: str, pairs: Sequence[tuple[str, str]]) -> tuple[list[list[int]], list[list[int]]]:
    """Per (concept prompt, anchor prompt): the context rows the concept's columns are taken at, and the anchor
    prompt's matching rows (:func:`~interp.studies.editing.edits.aligned_positions` in every run of token rows)."""
    kind = text_reader(model)
    ids_c = model.split_ids(model.tokenize([c for c, _ in pairs]))
    ids_a = model.split_ids(model.tokenize([a for _, a in pairs]))
    pos_c: list[list[int]] = [[] for _ in pairs]
    pos_a: list[list[int]] = [[] for _ in pairs]
    for parts, start in token_segments(model):
        found = None
        for part in parts:
            tok = model.tokenizers[part]
            before = kind == "joint" or reads_whole_prompt(model, part)
            m_c, m_a = attended_mask(model, part, ids_c[part]), attended_mask(model, part, ids_a[part])
            got = [aligned_positions(tok, ids_c[part][i].tolist(), subject_forms(tok, concept), concept, cp, ap,
                                     before=before,
                                     attended=None if m_c is None else (m_c[i].tolist(), m_a[i].tolist()))
                   for i, (cp, ap) in enumerate(pairs)]
            if found is None:
                found = got
            elif got != found:
                raise ValueError(f"the tokenizers of {parts[0]} and {part} place {concept!r} at different positions; "
                                 f"UCE needs them to agree, as they do in the {model.family.label} pipelines")
        for i, (p, q) in enumerate(found):
            pos_c[i] += [start + x for x in p]
            pos_a[i] += [start + x for x in q]
    return pos_c, pos_a


def seen_rows(model, prompts: Sequence[str]) -> list[list[int]]:
    """Per prompt, every context token row its readers see (all of them but padding under an attention mask)."""
    ids = model.split_ids(model.tokenize(list(prompts)))
    out: list[list[int]] = [[] for _ in prompts]
    for parts, start in token_segments(model):
        length = ids[parts[0]].shape[1]
        mask = attended_mask(model, parts[0], ids[parts[0]])
        for i in range(len(prompts)):
            out[i] += [start + p for p in range(length) if mask is None or bool(mask[i, p])]
    return out


def _token_states(model, prompts) -> torch.Tensor:
    """The text encoders' token states of ``prompts`` as the denoiser's context holds them, float64 on the CPU."""

    with torch.no_grad():
        ctx = run_text(model, model.tokenize(prompts, model.device))[0]
    return unpack(ctx, model.layout)[0].to(torch.float64).cpu()


def text_states(model, pairs: Sequence[tuple[str, str]], concept: str, preserve_prompts: Sequence[str] = ()):
    """Concept states C (in, N), matching anchor states (in, N), preserved states P (in, M); float64: the text
    encoders' states, which Stable Diffusion's and SDXL's cross-attentions read unchanged (SDXL: both CLIPs'
    penultimate states side by side). Other families' projections see something else (:func:`projection_inputs`)."""
    if model.family.name not in _STATES_AS_GIVEN:
        text_reader(model)
        raise ValueError(f"the {model.family.label} {model.denoiser_part} does not read the text encoders' states as "
                         f"they are: record its projections' inputs (projection_inputs)")
    concept_prompts = model.check_prompts([c for c, _ in pairs])
    anchor_prompts = model.check_prompts([a for _, a in pairs])
    pos_c, pos_a = context_positions(model, concept, list(zip(concept_prompts, anchor_prompts)))
    s_c, s_a = _token_states(model, concept_prompts), _token_states(model, anchor_prompts)
    C = torch.cat([s_c[i, p] for i, p in enumerate(pos_c)]).T.contiguous()
    A = torch.cat([s_a[i, p] for i, p in enumerate(pos_a)]).T.contiguous()
    if preserve_prompts:
        keep = model.check_prompts(list(preserve_prompts))
        s_p = _token_states(model, keep)
        P = torch.cat([s_p[i, r] for i, r in enumerate(seen_rows(model, keep))]).T.contiguous()
    else:
        P = torch.zeros(C.shape[0], 0, dtype=torch.float64)
    return C, A, P


def record_latents(model, n: int, seed: int, steps: int = RECORD_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and timestep of the first step of sampling, where the inputs are recorded: ``n`` seeded Gaussian
    latents, scaled as the scheduler scales its first input, and the first timestep of the model's ``steps``-step
    schedule (flow matching: sigma = 1)."""

    sched = diffusion.fresh_scheduler(model.scheduler)
    shape = diffusion.latent_shape(model, n)
    model.family.set_timesteps(sched, steps, model.device, shape)
    t = sched.timesteps[0]
    x = diffusion.initial_noise(model, n, torch.Generator().manual_seed(seed)) * getattr(sched, "init_noise_sigma", 1.0)
    if hasattr(sched, "scale_model_input"):
        x = sched.scale_model_input(x.to(t.device), t)
    return x, t


class _Recorded(Exception):
    """Raised by a hook to end a forward once the input it was asked for is recorded."""


def projection_inputs(model, paths: Sequence[str], prompts: Sequence[str], positions: Sequence[Sequence[int]],
                      latents: torch.Tensor, t, max_rows: int = RECORD_ROWS,
                      first_only: bool = False) -> tuple[list[list[str]], list[torch.Tensor]]:
    """What the projections ``paths`` really see for ``prompts``, recorded with forward hooks in a denoiser forward on
    ``latents`` at timestep ``t`` (the prompts' conditional rows; :func:`record_latents`): ``(groups, columns)``, the
    projections grouped by the tensor they read (a cross-attention's ``to_k`` and ``to_v`` read one; a UNet's or
    PixArt's cross-attentions all read the same context), groups in the order they run, and per group the input at
    each prompt's context rows ``positions`` as columns (in, N), float64 on the CPU. ``first_only``: record the
    first group alone and end each forward there (its inputs do not depend on anything after it)."""

    prompts = list(prompts)
    hooked = list(paths[:1]) if first_only else list(paths)
    groups: list[list[str]] | None = None
    cols: list[list[torch.Tensor]] = []
    for s in range(0, len(prompts), max_rows):
        rows = positions[s : s + max_rows]
        seen: list[torch.Tensor] = []
        names: list[list[str]] = []
        got: list[torch.Tensor] = []

        def make(path):
            def hook(module, args):
                x = args[0]
                for k, y in enumerate(seen):
                    if x is y:  # the same tensor as an earlier projection's input: the same group
                        names[k].append(path)
                        return
                seen.append(x)
                names.append([path])
                got.append(torch.cat([x[i, list(r)] for i, r in enumerate(rows)]).detach().to(torch.float64).cpu())
                if first_only:
                    raise _Recorded
            return hook

        handles = [model.module(p).register_forward_pre_hook(make(p)) for p in hooked]
        try:
            with torch.no_grad():
                ctx = run_text(model, model.tokenize(prompts[s : s + max_rows], model.device))[0]
                run_unet(model, latents[s : s + max_rows], t, ctx)
        except _Recorded:
            pass
        finally:
            for h in handles:
                h.remove()
            seen.clear()
        if groups is None:
            missing = sorted(set(hooked) - {p for g in names for p in g})
            if missing:
                raise ValueError(f"{missing[:2]} never ran in a forward of the {model.denoiser_part} (fused "
                                 f"projections?): UCE edits each projection it reads the text through")
            groups, cols = names, [[] for _ in names]
        elif names != groups:
            raise RuntimeError(f"the projections read different tensors in two forwards: {names} vs {groups}")
        for k, c in enumerate(got):
            cols[k].append(c)
    return groups or [], [torch.cat(c).T.contiguous() for c in cols]


def _not_edited(model) -> str | None:
    """What reads the text but is left alone (FLUX's single-stream blocks), for the edit's record."""
    single = getattr(model.denoiser, "single_transformer_blocks", None)
    if single is not None and len(single):
        return (f"{len(single)} single-stream blocks (their to_k/to_v are shared by the image and the text tokens; "
                f"they read the context stream the edited double-stream blocks leave)")
    return None


def _solve_recorded(model, paths, pairs, concept, keep, lam, erase_scale, preserve_scale, seed, max_rows):
    """Per projection, UCE on its recorded inputs, block after block (see the module's docstring)."""
    concept_prompts = model.check_prompts([c for c, _ in pairs])
    anchor_prompts = model.check_prompts([a for _, a in pairs])
    pos_c, pos_a = context_positions(model, concept, list(zip(concept_prompts, anchor_prompts)))
    lat, t = record_latents(model, len(pairs), seed)  # a concept prompt and its anchor share their latents
    groups, C0 = projection_inputs(model, paths, concept_prompts, pos_c, lat, t, max_rows)
    g_a, A0 = projection_inputs(model, paths, anchor_prompts, pos_a, lat, t, max_rows)
    if keep:
        pos_p = seen_rows(model, keep)
        lat_p, _ = record_latents(model, len(keep), seed + 1)
        g_p, P0 = projection_inputs(model, paths, keep, pos_p, lat_p, t, max_rows)
    else:
        g_p, P0 = groups, [torch.zeros(c.shape[0], 0, dtype=torch.float64) for c in C0]
    if not groups == g_a == g_p:
        raise RuntimeError(f"the projections read their inputs differently for different prompts: {groups}, {g_a}")
    sols, updates = [], []
    for g, group in enumerate(groups):
        C, P = C0[g], P0[g]
        if g > 0:  # this block reads what the edited blocks before it pass on
            with WeightEdit(tuple(updates)).apply(model):
                C = projection_inputs(model, group, concept_prompts, pos_c, lat, t, max_rows, first_only=True)[1][0]
                if keep:
                    P = projection_inputs(model, group, keep, pos_p, lat_p, t, max_rows, first_only=True)[1][0]
        for path in group:
            W0 = model.module(path).weight.detach().to(torch.float64).cpu()
            sol = uce_solve(W0, C, W0 @ A0[g], P, lam, erase_scale, preserve_scale, P_target=W0 @ P0[g])
            sols.append((path, sol))
            updates.append(WeightUpdate(f"{path}.weight", sol.W_star.reshape(-1).clone()))
    info = {"inputs": f"recorded at each projection (denoiser forward at t={float(t):g}, the first step of a "
                      f"{RECORD_STEPS}-step schedule, seeded latents)",
            "timestep": float(t), "blocks_solved_in_turn": len(groups),
            "n_concept_states": C0[0].shape[1], "n_preserve_states": P0[0].shape[1]}
    if _not_edited(model):
        info["not_edited"] = _not_edited(model)
    return sols, info


def uce_solutions(model, concept: str, anchor: str | None = None, preserve: int | Sequence[str] = 32,
                  lam: float = UCE_LAMBDA, erase_scale: float = UCE_ERASE_SCALE,
                  preserve_scale: float = UCE_PRESERVE_SCALE, with_to_k: bool = True, n_per_template: int = 2,
                  seed: int = EDIT_SEED, max_rows: int = RECORD_ROWS) -> tuple[list[tuple[str, UCESolution]], dict]:
    """UCE's solution for every edited projection, ``[(path, solution)]`` in execution order, and its bookkeeping
    (see :func:`uce`)."""
    pairs = quickfix_prompts(model, concept, anchor, n_per_template, seed)
    keep = list(preserve) if not isinstance(preserve, int) else preserve_prompts(model, concept, preserve, seed)
    if not isinstance(preserve, int) and any(not isinstance(p, str) or not p.strip() for p in keep):
        raise ValueError("preserve prompts must be non-empty strings")
    if isinstance(preserve, int) and not model.is_concept_world:
        keep = []  # no principled default away from the concept world: the caller names what to keep
    paths = cross_attention_projections(model, with_to_k)
    if model.family.name in _STATES_AS_GIVEN:
        C, A, P = text_states(model, pairs, concept, keep)
        sols = []
        for path in paths:
            W0 = model.module(path).weight.detach().to(torch.float64).cpu()
            sols.append((path, uce_solve(W0, C, W0 @ A, P, lam, erase_scale, preserve_scale)))
        info = {"inputs": "the text encoders' states (the context every cross-attention reads)",
                "n_concept_states": C.shape[1], "n_preserve_states": P.shape[1]}
    else:
        sols, info = _solve_recorded(model, paths, pairs, concept, model.check_prompts(keep) if keep else [], lam,
                                     erase_scale, preserve_scale, seed, max_rows)
    return sols, {**info, "pairs": pairs, "preserve_prompts": keep}


def uce(model, concept: str, anchor: str | None = None, preserve: int | Sequence[str] = 32,
        lam: float = UCE_LAMBDA, erase_scale: float = UCE_ERASE_SCALE, preserve_scale: float = UCE_PRESERVE_SCALE,
        with_to_k: bool = True, n_per_template: int = 2, seed: int = EDIT_SEED,
        max_rows: int = RECORD_ROWS) -> WeightEdit:
    """UCE erasure of ``concept`` (towards ``anchor``: the word left out by default) as a weight edit.

    ``preserve``: a number of generated prompts without the concept (concept world) or explicit prompts.
    ``max_rows``: prompts per denoiser forward where the inputs are recorded (PixArt, SD3, FLUX).
    """
    t0 = time.perf_counter()
    sols, info = uce_solutions(model, concept, anchor, preserve, lam, erase_scale, preserve_scale, with_to_k,
                               n_per_template, seed, max_rows)
    updates = tuple(WeightUpdate(f"{path}.weight", sol.W_star.reshape(-1).clone()) for path, sol in sols)
    residuals = [sol.residual() for _, sol in sols]
    changes = [float((sol.W_star - sol.W0).norm() / sol.W0.norm()) for _, sol in sols]
    extra = {k: v for k, v in info.items() if k not in ("pairs", "preserve_prompts", "n_concept_states",
                                                        "n_preserve_states")}
    return WeightEdit(updates, name="uce", method="closed form (no attribution)", concept=concept,
                      objective=None, seconds=time.perf_counter() - t0, budget=None,
                      info={"modules": len(updates), "lambda": lam, "erase_scale": erase_scale,
                            "preserve_scale": preserve_scale, "anchor": anchor or "(word left out)",
                            "n_concept_states": info["n_concept_states"],
                            "n_preserve_states": info["n_preserve_states"],
                            "npreserve_prompts": len(info["preserve_prompts"]), "with_to_k": with_to_k,
                            "max_normal_equation_residual": max(residuals),
                            "mean_relative_change": sum(changes) / len(changes), "n_prompt_pairs": len(info["pairs"]),
                            "projections": "cross-attention to_k/to_v" if text_reader(model) == "cross" else
                            "joint-attention context add_k_proj/add_v_proj", **extra})
