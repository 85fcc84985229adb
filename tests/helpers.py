"""Assertions several test files share (imported as ``helpers``: pytest puts this folder on the path)."""

from __future__ import annotations

import torch


def changed_weights(model, before) -> list[str]:
    """Names of the weights that differ (bitwise) from the fingerprint ``before``."""
    after = model.state_fingerprint()
    assert before.keys() == after.keys()
    return [n for n in before if not torch.equal(before[n], after[n])]


def assert_weights_equal(model, before) -> None:
    changed = changed_weights(model, before)
    assert not changed, f"weights changed: {changed[:5]}"


def assert_no_hooks(model) -> None:
    for prefix, root in model.modules().items():
        for n, mod in root.named_modules():
            hooks = {k: len(getattr(mod, k)) for k in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                        "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
                     if len(getattr(mod, k, {}))}
            assert not hooks, f"{prefix}.{n} has hooks left: {hooks}"


def assert_untouched(model, before) -> None:
    """Weights bitwise as before, no hooks left, nothing requires grad or holds a .grad."""
    assert_weights_equal(model, before)
    assert_no_hooks(model)
    for n, p in model.parameters():
        assert not p.requires_grad, f"{n} still requires grad"
        assert p.grad is None, f"{n} has a .grad"


class Killed(Exception):
    """Raised by :func:`killed_at_second_masked_call`: a run interrupted between two cached chunks."""


def killed_at_second_masked_call(monkeypatch) -> None:
    """Make ``Objective.values`` raise :class:`Killed` on its second call with multipliers (the second chunk of a
    sweep); ``monkeypatch.undo()`` restores it."""
    from interp.objectives import Objective

    real, calls = Objective.values, {"n": 0}

    def dying(self, plan=None, mult=None, *args, **kwargs):
        if mult is not None:
            calls["n"] += 1
            if calls["n"] == 2:
                raise Killed
        return real(self, plan, mult, *args, **kwargs)

    monkeypatch.setattr(Objective, "values", dying)
