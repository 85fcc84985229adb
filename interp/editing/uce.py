"""Unified Concept Editing (Gandikota, Orgad, Belinkov, Materzynska, Bau; WACV 2024, arXiv 2308.14761).

A closed-form edit of the key and value projections (``to_k``, ``to_v``) of every UNet cross-attention (``attn2``):
the only weights that read the text. For the concept's text states ``c_i`` (the text encoder's outputs at the last
token of the concept and every later position, where the UNet reads what the concept passed on) the edited
projection should give what the unedited one gives for the anchor's states ``c*_i`` at matching positions
(``v*_i = W_old c*_i``), while the states ``c_j`` of preserved prompts keep their outputs (``W_old c_j``). The
least-squares solution with a ridge pull towards ``W_old``:

    W = (e sum_i v*_i c_i^T + p sum_j W_old c_j c_j^T + lam W_old) (e sum_i c_i c_i^T + p sum_j c_j c_j^T + lam I)^-1

with ``e`` the erase scale, ``p`` the preserve scale and ``lam`` the ridge (the paper's defaults: ``lam = 0.1``,
``e = 1``). Solved in float64 through a linear solve, never an explicit inverse. Positions are aligned from the
concept's last token (the anchor prompt is shifted by the difference of the two prompts' token counts), as in the
reference implementation and in :mod:`interp.editing.edits`' Diff-QuickFix. The edit is a
:class:`~interp.editing.edits.WeightEdit`: applied inside a context, the weights are restored bitwise on exit.

Which prompts carry the concept: on the concept world, captions of scenes with the concept and the same captions
without the word (or with ``anchor`` in its place); elsewhere the default templates around the phrase, anchored to
the empty prompt. Preserved prompts: on the concept world, captions of scenes without the concept; elsewhere the
caller's ``preserve`` prompts (none by default).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .edits import EDIT_SEED, WeightEdit, WeightUpdate, _preserve_prompts, aligned_positions, quickfix_prompts

UCE_LAMBDA = 0.1
UCE_ERASE_SCALE = 1.0
UCE_PRESERVE_SCALE = 0.1


@dataclass(frozen=True, eq=False)
class UCESolution:
    """One projection's solution: ``W (e C C^T + p P P^T + lam I) = e V C^T + p W0 P P^T + lam W0`` (float64)."""

    W_star: torch.Tensor  # (out, in)
    W0: torch.Tensor  # (out, in)
    C: torch.Tensor  # (in, N) concept states as columns
    V: torch.Tensor  # (out, N) target outputs as columns
    P: torch.Tensor  # (in, M) preserved states as columns (M may be 0)
    lam: float
    erase_scale: float
    preserve_scale: float

    def _system(self):
        eye = torch.eye(self.C.shape[0], dtype=self.C.dtype)
        PP = self.P @ self.P.T
        A = self.erase_scale * self.C @ self.C.T + self.preserve_scale * PP + self.lam * eye
        B = self.erase_scale * self.V @ self.C.T + self.preserve_scale * self.W0 @ PP + self.lam * self.W0
        return A, B

    def residual(self) -> float:
        """Largest absolute violation of the normal equations, relative to the right-hand side's scale."""
        A, B = self._system()
        return float((self.W_star @ A - B).abs().max() / B.abs().max().clamp_min(1e-300))


def uce_solve(W0: torch.Tensor, C: torch.Tensor, V: torch.Tensor, P: torch.Tensor | None = None,
              lam: float = UCE_LAMBDA, erase_scale: float = UCE_ERASE_SCALE,
              preserve_scale: float = UCE_PRESERVE_SCALE) -> UCESolution:
    """UCE's closed form for one projection ``W0`` (out, in); states as columns; float64."""
    if lam <= 0:
        raise ValueError(f"lam must be positive (it keeps the system invertible), got {lam}")
    if erase_scale < 0 or preserve_scale < 0:
        raise ValueError(f"erase_scale and preserve_scale must be >= 0, got {erase_scale}, {preserve_scale}")
    W0, C, V = (x.detach().to(torch.float64) for x in (W0, C, V))
    P = torch.zeros(C.shape[0], 0, dtype=torch.float64) if P is None else P.detach().to(torch.float64)
    if C.shape[0] != W0.shape[1] or V.shape[0] != W0.shape[0] or C.shape[1] != V.shape[1] or P.shape[0] != C.shape[0]:
        raise ValueError(f"shapes do not match: W0 {tuple(W0.shape)}, C {tuple(C.shape)}, V {tuple(V.shape)}, "
                         f"P {tuple(P.shape)}")
    sol = UCESolution(torch.empty(0), W0, C, V, P, lam, erase_scale, preserve_scale)
    A, B = sol._system()
    W_star = torch.linalg.solve(A, B.T).T  # A is symmetric: W A = B  <=>  A W^T = B^T
    return UCESolution(W_star, W0, C, V, P, lam, erase_scale, preserve_scale)


def refuse_other_families(model, edit: str) -> None:
    """The closed-form edits solve for one text encoder's states and a UNet's cross-attention: Stable Diffusion
    1.x/2.x. Other families (SDXL's two encoders, the transformers' context streams) are refused by name."""
    if model.family.name != "sd":
        raise ValueError(f"{edit} is implemented for Stable Diffusion 1.x/2.x (one CLIP text encoder, UNet "
                         f"cross-attention), not yet for {model.family.label}; use the attribution-guided ablations "
                         f"of erasure_curves on this model")


def cross_attention_projections(model, with_to_k: bool = True) -> list[str]:
    """Module paths of every UNet cross-attention's value (and key) projection, in execution order."""
    refuse_other_families(model, "UCE")
    paths = [p for p in model.space.modules if p.startswith("unet.") and p.endswith(".attn2.to_v")]
    if with_to_k:
        paths += [p[: -len("to_v")] + "to_k" for p in paths]
    if not paths:
        raise ValueError("the UNet has no cross-attention (attn2) projections: UCE edits those")
    return sorted(paths, key=lambda p: model.events[("in", p)])


def text_states(model, pairs: Sequence[tuple[str, str]], concept: str, preserve_prompts: Sequence[str] = ()):
    """Concept states C (in, N), matching anchor states (in, N), preserved states P (in, M); float64."""
    from .. import diffusion
    from ..interventions import run_text

    tok = model.tokenizer
    subject = tok(concept, add_special_tokens=False).input_ids
    concept_prompts = model.check_prompts([c for c, _ in pairs])
    anchor_prompts = model.check_prompts([a for _, a in pairs])
    with torch.no_grad():
        ids_c = diffusion.tokenize(tok, concept_prompts, model.device)
        s_c = run_text(model, ids_c)[0].to(torch.float64).cpu()
        s_a = run_text(model, diffusion.tokenize(tok, anchor_prompts, model.device))[0].to(torch.float64).cpu()
    cs, anchors = [], []
    for i, (cp, ap) in enumerate(zip(concept_prompts, anchor_prompts)):
        pos, apos = aligned_positions(tok, ids_c[i].tolist(), subject, concept, cp, ap)
        cs.append(s_c[i, pos])
        anchors.append(s_a[i, apos])
    C = torch.cat(cs).T.contiguous()
    A = torch.cat(anchors).T.contiguous()
    if preserve_prompts:
        with torch.no_grad():
            ids_p = diffusion.tokenize(tok, model.check_prompts(list(preserve_prompts)), model.device)
            P = run_text(model, ids_p)[0].to(torch.float64).cpu().reshape(-1, C.shape[0]).T.contiguous()
    else:
        P = torch.zeros(C.shape[0], 0, dtype=torch.float64)
    return C, A, P


def uce(model, concept: str, anchor: str | None = None, preserve: int | Sequence[str] = 32,
        lam: float = UCE_LAMBDA, erase_scale: float = UCE_ERASE_SCALE, preserve_scale: float = UCE_PRESERVE_SCALE,
        with_to_k: bool = True, n_per_template: int = 2, seed: int = EDIT_SEED) -> WeightEdit:
    """UCE erasure of ``concept`` (towards ``anchor``: the word left out by default) as a weight edit.

    ``preserve``: a number of generated prompts without the concept (concept world) or explicit prompts.
    """
    t0 = time.perf_counter()
    pairs = quickfix_prompts(model, concept, anchor, n_per_template, seed)
    keep = list(preserve) if not isinstance(preserve, int) else _preserve_prompts(model, concept, preserve, seed)
    if not isinstance(preserve, int) and any(not isinstance(p, str) or not p.strip() for p in keep):
        raise ValueError("preserve prompts must be non-empty strings")
    if isinstance(preserve, int) and not model.is_concept_world:
        keep = []  # no principled default away from the concept world: the caller names what to keep
    C, A, P = text_states(model, pairs, concept, keep)
    updates, residuals, changes = [], [], []
    for path in cross_attention_projections(model, with_to_k):
        W0 = model.module(path).weight.detach().to(torch.float64).cpu()
        sol = uce_solve(W0, C, W0 @ A, P, lam, erase_scale, preserve_scale)
        updates.append(WeightUpdate(f"{path}.weight", sol.W_star.reshape(-1).clone()))
        residuals.append(sol.residual())
        changes.append(float((sol.W_star - W0).norm() / W0.norm()))
    return WeightEdit(tuple(updates), name="uce", method="closed form (no attribution)", concept=concept,
                      objective=None, seconds=time.perf_counter() - t0, budget=None,
                      info={"modules": len(updates), "lambda": lam, "erase_scale": erase_scale,
                            "preserve_scale": preserve_scale, "anchor": anchor or "(word left out)",
                            "n_concept_states": C.shape[1], "n_preserve_states": P.shape[1],
                            "n_preserve_prompts": len(keep), "with_to_k": with_to_k,
                            "max_normal_equation_residual": max(residuals),
                            "mean_relative_change": sum(changes) / len(changes), "n_prompt_pairs": len(pairs)})
