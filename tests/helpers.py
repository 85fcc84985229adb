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
    from interp.core.objectives import Objective

    real, calls = Objective.values, {"n": 0}

    def dying(self, plan=None, mult=None, *args, **kwargs):
        if mult is not None:
            calls["n"] += 1
            if calls["n"] == 2:
                raise Killed
        return real(self, plan, mult, *args, **kwargs)

    monkeypatch.setattr(Objective, "values", dying)


# -- the main job, small, and killed midway ------------------------------------------------------------------------
def unet_rows(monkeypatch) -> list[int]:
    """The batch size of every UNet forward from now on (diffusers' ``UNet2DConditionModel.forward`` wrapped, in
    whatever process-local model a command loads), in a list that fills as they run."""
    from diffusers import UNet2DConditionModel

    rows, forward = [], UNet2DConditionModel.forward

    def counted(self, sample, *args, **kwargs):
        rows.append(sample.shape[0])
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counted)
    return rows


def compare_args(world, out, *extra) -> list[str]:
    """``compare_methods`` arguments of a small run on a tiny concept-world folder (a few seconds)."""
    return ["--model", str(world), "--concepts", "red", "circle", "--images", "2", "--timesteps", "300",
            "--blocks", "mid_block", "--heldout-masks", "16", "--maskgrad-masks", "4", "--maskgrad-curve", "2",
            "--n-boot", "100", "--out", str(out), "--no-progress", "--threads", "1", *extra]


def killed_compare_run(args: list[str], out, root, results: int = 3, timeout: float = 300) -> int:
    """Run ``compare_methods args`` in a subprocess and SIGKILL it once ``results`` method results are cached in
    ``out``; returns its exit code (non-zero when it was killed)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = Path(out)
    proc = subprocess.Popen([sys.executable, "-m", "analyses.compare_methods", *args], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            done = list((out / "cache").glob("*/result.parquet")) if (out / "cache").exists() else []
            if len(done) >= results or proc.poll() is not None:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode


def assert_same_tables(a, b) -> None:
    """Two comparison run folders hold the same results and every table byte for byte, cost included; only
    wall_time.csv (the seconds each method took) differs between any two runs."""
    from pathlib import Path

    import pandas as pd

    a, b = Path(a), Path(b)
    pd.testing.assert_frame_equal(pd.read_parquet(a / "results.parquet"), pd.read_parquet(b / "results.parquet"))
    names = sorted(p.name for p in (a / "tables").glob("*.csv"))
    assert names == sorted(p.name for p in (b / "tables").glob("*.csv")) and "cost.csv" in names
    for name in names:
        if name != "wall_time.csv":
            assert (a / "tables" / name).read_text() == (b / "tables" / name).read_text(), name


def in_ci() -> bool:
    """Whether this run is CI's (``CI=true``, as ``.ci/run`` sets), where nothing may be skipped quietly."""
    import os

    return os.environ.get("CI", "").lower() in ("true", "1")


def skip_unless_ci(reason: str, module_level: bool = False):
    """Skip the calling test (or module) for ``reason``; under ``CI=true`` fail instead: in CI every optional
    dependency is installed and every tracked file is checked out, so a skip would hide a test that never ran."""
    import pytest

    if in_ci():
        pytest.fail(f"CI=true, and this test would have been skipped: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)


def import_or_skip(name: str, module_level: bool = False):
    """``pytest.importorskip`` that fails under ``CI=true`` (:func:`skip_unless_ci`)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        skip_unless_ci(f"{name} is not installed ({err}; pip install -e '.[dev]')", module_level)


def require_ray() -> None:
    """Skip the calling test module without Ray (an optional extra), except under ``CI=true``, where ``.ci/run``
    installs it and a skip would hide that the executor was never tested."""
    import os

    import pytest

    try:
        import ray  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            raise ImportError("CI=true but Ray is not installed: .ci/run must install the '.[ray]' extra") from None
        pytest.skip("Ray is not installed (pip install -e '.[ray]')", allow_module_level=True)


# -- test objectives with known answers ------------------------------------------------------------------------------
MID = "unet.mid_block.attentions.0.transformer_blocks.0"


def _objective_base():
    from interp.core.objectives import Objective

    return Objective


class LinearFF(_objective_base()):
    """``J = mean over tokens and features of v * (output of one block's ff.net.2)``: exactly linear in the
    multipliers of that block's GEGLU hidden units (``ff.net.0[j]``), with one evaluation branch (kind="amplify"), the
    rows laid out as :meth:`Objective._chunk` does (mask row r, then sample s)."""

    def __init__(self, model, concept, config, block, v):
        self.block, self.v = block, v
        super().__init__(model, concept, config)

    def _chunk(self, plan, mult, means, target_context, unet_patches, samples=None, recompute_text=False,
               record=None, intervene_anchor=True, replay=False):  # full passes whatever replay says
        from interp.core.interventions import run_unet

        r = 1 if mult is None else mult.shape[0]
        if target_context is not None and target_context.shape[0] != self.config.n_images:  # causal tracing's rows
            r = target_context.shape[0] // self.config.n_images
        sel = torch.arange(self.n_samples) if samples is None else torch.as_tensor(samples)
        S = len(sel)
        ctx = self.target_contexts(target_context, sel, r)
        x, t = self.x_t[sel].repeat(r, 1, 1, 1), self.t[sel].repeat(r)
        rows = None if mult is None else mult.repeat_interleave(S, 0)
        path = f"{self.block}.ff.net.2"
        _, saved = run_unet(self.model, x, t, ctx, plan, rows, means, saves=[path])
        h = saved[path]
        return (h * self.v.to(h.dtype)).mean(dim=(1, 2)).reshape(r, S)


class ProductFF(LinearFF):
    """``J = 1e3 * L1 * L2 (* L3 ...)`` with ``L_i`` linear readouts (:class:`LinearFF`) of one block's ff.net.2
    output: an exact polynomial in the GEGLU units' multipliers with known interactions (for two readouts
    ``dJ/dm_a = 1e3 (g1_a L2 + g2_a L1)``)."""

    def __init__(self, model, concept, config, block, *vs):
        if len(vs) < 2:
            raise ValueError("a product needs at least two readouts")
        self.vs = vs
        super().__init__(model, concept, config, block, vs[0])

    def _chunk(self, plan, mult, means, target_context, unet_patches, samples=None, recompute_text=False,
               record=None, intervene_anchor=True, replay=False):  # full passes whatever replay says
        J = 1e3
        for L in self._readouts(plan, mult, means, target_context, unet_patches, samples, recompute_text, record):
            J = J * L
        return J

    def _readouts(self, *args):
        out, v = [], self.v
        try:
            for vi in self.vs:
                self.v = vi
                out.append(LinearFF._chunk(self, *args))
        finally:
            self.v = v
        return out

    def readouts(self, plan, M) -> torch.Tensor:
        """The readouts ``L_i`` under multiplier rows ``M``, averaged over the samples: ``(len(vs), rows)``."""
        with torch.no_grad():
            return torch.stack([L.mean(1) for L in self._readouts(plan, M, None, None, None, None)])


# -- runs whose figures no test looks at ---------------------------------------------------------------------------
def placeholder_figures(monkeypatch) -> None:
    """Every figure :mod:`interp.report.plots` makes becomes an empty one, and every figure written (by any module,
    through ``plots.fig_to_png``) a 1x1 PNG: for tests of runs that look at tables, caches, counts and files but never
    at a
    figure's pixels. Drawing is most of a small run's time (seaborn's heatmaps and scatter plots, constrained layout,
    a tight bounding box); the names and number of the figures stay the run's own. ``monkeypatch.undo()`` restores."""
    import inspect
    import io

    from matplotlib.figure import Figure
    from PIL import Image

    import interp.report.plots as plots

    buf = io.BytesIO()
    Image.new("RGB", (1, 1), "white").save(buf, format="PNG")
    png = buf.getvalue()
    for name, fn in vars(plots).items():
        if (inspect.isfunction(fn) and fn.__module__ == plots.__name__ and not name.startswith("_")
                and inspect.signature(fn).return_annotation in ("Figure", Figure)):
            monkeypatch.setattr(plots, name, lambda *args, **kwargs: Figure())
    monkeypatch.setattr(plots, "fig_to_png", lambda fig, dpi=110: png)


# -- plain-torch known answers: the model run with forward hooks, removed afterwards ------------------------------------
def denoise_with_kv_written(model, attn, keys, values, write, x, t, ctx):
    """The plain denoiser output with forward hooks on cross-attention ``attn``'s ``to_k`` and ``to_v``: each output
    is cloned and ``write(out, ref)`` changes it in place, ``ref`` being ``keys`` or ``values`` (the hooks are removed
    afterwards, also on an error)."""
    import torch

    from interp.core.interventions import call_denoiser

    def hook(ref):
        def fn(module, args, out):
            out = out.clone()
            write(out, ref)
            return out
        return fn

    handles = [attn.to_k.register_forward_hook(hook(keys)), attn.to_v.register_forward_hook(hook(values))]
    try:
        with torch.no_grad():
            return call_denoiser(model, x, t, ctx)
    finally:
        for handle in handles:
            handle.remove()


def values_with_hook(obj, module, hook):
    """An objective's J (its first mask row) with a forward ``hook`` on ``module``, computed in full passes (no replay
    of cached upstream states, which the hook would not see); the hook removed and replay restored afterwards."""
    import torch

    obj.replay_prefix = False
    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return obj.values()[0]
    finally:
        handle.remove()
        obj.replay_prefix = True
