"""Unified Concept Editing: its closed form and its runtime (restores the weights bitwise)."""

from __future__ import annotations

import pytest
import torch

from interp.studies.editing.uce import cross_attention_projections, text_states, uce, uce_solve


def test_closed_form_solves_the_normal_equations():
    g = torch.Generator().manual_seed(0)
    W0, C, V, P = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 5), (5, 3), (6, 3), (5, 4)))
    sol = uce_solve(W0, C, V, P, lam=0.1, erase_scale=1.0, preserve_scale=0.5)
    A = C @ C.T + 0.5 * P @ P.T + 0.1 * torch.eye(5, dtype=torch.float64)
    B = V @ C.T + 0.5 * W0 @ P @ P.T + 0.1 * W0
    torch.testing.assert_close(sol.W_star @ A, B)
    assert sol.residual() < 1e-12
    # no concept states and no preserved ones: nothing to change
    empty = uce_solve(W0, C[:, :0], V[:, :0], None, lam=0.1)
    torch.testing.assert_close(empty.W_star, W0)
    # a tiny ridge maps the concept states onto their targets
    exact = uce_solve(W0, C, V, None, lam=1e-9)
    torch.testing.assert_close(exact.W_star @ C, V, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="lam"):
        uce_solve(W0, C, V, lam=0)
    with pytest.raises(ValueError, match="shapes"):
        uce_solve(W0, C.T, V)


def test_uce_edits_every_cross_attention_and_restores_bitwise(tiny_world_model):
    model = tiny_world_model
    before = model.state_fingerprint()
    edit = uce(model, "red", preserve=8)
    paths = cross_attention_projections(model)
    assert {u.param for u in edit.updates} == {f"{p}.weight" for p in paths}
    assert edit.info["max_normal_equation_residual"] < 1e-8
    assert any(p.endswith("to_k") for p in paths) and any(p.endswith("to_v") for p in paths)
    C, A, _ = text_states(model, [("a red circle", "a circle")], "red")
    v = model.module(paths[0])
    with edit.apply(model):
        changed = any(not torch.equal(before[k], p) for k, p in model.parameters())
        out_edit = v(C.T.to(v.weight.dtype)).double()
    assert changed
    after = model.state_fingerprint()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the edited projection moves the concept's states towards the anchor's outputs
    target = (A.T.to(v.weight.dtype) @ v.weight.T).double()
    orig = v(C.T.to(v.weight.dtype)).double()
    assert (out_edit - target).norm() < (orig - target).norm()


def test_uce_restores_weights_when_the_body_raises(tiny_world_model):
    model = tiny_world_model
    before = model.state_fingerprint()
    edit = uce(model, "circle", preserve=0, with_to_k=False)
    with pytest.raises(KeyError, match="inside"):
        with edit.apply(model):
            raise KeyError("inside")
    after = model.state_fingerprint()
    assert all(torch.equal(before[k], after[k]) for k in before)
