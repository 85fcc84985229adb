"""The cost plan (interp.studies.plan): its counts equal what a run records, for every registered method, and it prints
in seconds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import interp
import interp.core.models
from interp.methods import REGISTRY
from interp.studies.compare import CompareConfig, run_comparison
from interp.studies.plan import plan_comparison


def tiny_config(folder: Path, **kw) -> CompareConfig:
    base = dict(model=str(folder), concepts=("red",), methods=tuple(sorted(REGISTRY, key=lambda m: m != "ablation")),
                n_images=2, timesteps=(300,), blocks=("mid_block",), heldout_masks=12,
                options={"maskgrad": {"n_masks": 3, "curve": (2,)}}, lds_alphas=(0.05, 0.2), n_boot=100)
    base.update(kw)
    return CompareConfig(**base)


@pytest.mark.parametrize("objective,anchor,extra", [
    ("erase", "shared", {}),
    pytest.param("amplify", "shared", {}, marks=pytest.mark.slow),
    pytest.param("erase", "frozen", {}, marks=pytest.mark.slow),
    # through generation, its calls split within a small max_batch (causal tracing's patched calls included)
    pytest.param("classifier", "shared", {"gen_steps": 2, "max_batch": 4}, marks=pytest.mark.slow)])
def test_planned_counts_equal_the_runs_recorded_counts(tiny_world_folder, tmp_path, monkeypatch, objective, anchor,
                                                       extra, no_figures):
    cfg = tiny_config(tiny_world_folder, objective=objective, anchor=anchor, **extra)
    model = interp.load_model(cfg.model)
    plan = plan_comparison(cfg, model=model, measure=True)
    assert model.counters["unet_rows"] == 0, "the plan's measured passes must not count as work"
    # the shape the plan assumes is the objective's
    from interp.core.objectives import Objective

    obj = Objective(model, "red", cfg.objective_config())
    assert (plan.shape.rows_per_eval, plan.shape.n_samples, plan.shape.branches) == \
        (obj.rows_per_eval, obj.n_samples, obj.branches)
    model.counters.clear()

    monkeypatch.setattr(interp.core.models, "load_model", lambda *a, **k: model)  # read the run's counters afterwards
    result = run_comparison(cfg, tmp_path / "run", progress=False)
    recorded = result["meta"]["methods"]
    t = plan.table.set_index(["method", "concept"])
    assert set(REGISTRY) <= set(cfg.methods)
    for method in cfg.methods:
        meta = recorded[f"{method}/red"]
        planned = t.loc[(method, "red")]
        if "forward_evals_all_alphas" in meta:  # maskgrad records the cost of one rate's estimate as its forward_evals
            assert planned["forward_evals"] == pytest.approx(meta["forward_evals_all_alphas"], abs=1e-12), method
            assert planned["backward_evals"] == pytest.approx(meta["forward_evals_all_alphas"], abs=1e-12), method
            n_rates = 1 + len(cfg.method_options(method, plan.n_components)["extra_alphas"])
            assert planned["forward_evals"] == pytest.approx(meta["cost"]["forward_evals"] * n_rates, abs=1e-12)
        else:
            assert planned["forward_evals"] == pytest.approx(meta["cost"]["forward_evals"], abs=1e-12), method
            assert planned["backward_evals"] == pytest.approx(meta["cost"]["backward_evals"], abs=1e-12), method
    # everything the run did through the UNet (objective setup and held-out sets included) was planned, row for row
    assert model.counters["unet_rows"] == plan.table["unet_rows"].sum()
    assert model.counters["unet_rows_grad"] == plan.table["unet_rows_grad"].sum()


def test_plan_prints_in_seconds_on_the_shipped_world():
    t0 = time.perf_counter()
    plan = plan_comparison(CompareConfig())
    seconds = time.perf_counter() - t0
    text = plan.format()
    assert seconds < 60, f"the plan took {seconds:.1f} s"  # about 5 s on an idle 2-core machine
    assert "TOTAL" in text and "GFLOP/s" in text
    totals = plan.totals()
    n = plan.n_components
    assert totals.loc["ablation", "forward_evals"] == 5 * n  # five concepts, one evaluation per component
    assert totals.loc["coar", "forward_evals"] == 5 * 2 * n  # twice as many masks as components
    assert (plan.table["seconds"] > 0).all() and (plan.table["flops"] > 0).all()
    for key in ("forward", "grad"):
        p = plan.passes[key]
        assert p["rows"] >= 1 and p["seconds"] > 0 and p["flops"] > 0
        assert p["peak_bytes"] is None or p["peak_bytes"] > 0
    assert "replay the UNet upstream" in text  # true ablation and tracing run below their full-pass projection


@pytest.mark.slow  # several seconds: plans from the command line
def test_plan_projects_onto_ray_workers_from_the_command_line(capsys):
    from analyses.compare_methods import main

    # --threads 1: main sets torch's thread count for the process, and the tests run on one thread (conftest)
    assert main(["--plan", "--executor", "ray", "--ray-workers", "4", "--concepts", "red", "--methods", "ablation",
                 "coar", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "on 4 workers passing at the speed measured here" in out


def test_meta_flop_count_matches_a_real_pass(tiny_world_model):
    """FLOPs counted on the meta copy equal those of a real pass (the tiny model's attention is counted on both
    paths only when the math kernel runs, so compare with SDPA's math backend)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from interp.core.diffusion import latent_shape
    from interp.studies.plan import _meta_flops

    m = tiny_world_model
    per_row, _ = _meta_flops(m, m.components("neuron", kind="ff.net.2"))
    x = torch.randn(latent_shape(m.unet, 3))
    ctx = m.text_encoder(torch.zeros(3, m.tokenizer.model_max_length, dtype=torch.long))[0]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        m.unet(x, torch.full((3,), 10), encoder_hidden_states=ctx, return_dict=False)
    assert fc.get_total_flops() == pytest.approx(3 * per_row, rel=1e-6)


def test_a_short_measured_pass_is_timed_twice_and_the_faster_kept(monkeypatch):
    """The first pass at a shape pays one-off costs; a cheap pass is repeated, an expensive one is not."""
    import interp.studies.plan as plan_mod

    runs = []

    def fake(seconds):
        it = iter(seconds)

        def timed(model, plan, rows, grad, size=None):
            runs.append(rows)
            return {"rows": rows, "seconds": next(it), "peak_bytes": 100 * len(runs)}
        return timed

    monkeypatch.setattr(plan_mod, "_timed_pass", fake([2.0, 1.5]))
    q = plan_mod._steady_pass(None, None, 8, False)
    assert (q["seconds"], q["timed"], q["peak_bytes"], len(runs)) == (1.5, 2, 200, 2)
    runs.clear()
    monkeypatch.setattr(plan_mod, "_timed_pass", fake([plan_mod.REPEAT_BELOW + 1, 0.1]))
    q = plan_mod._steady_pass(None, None, 1, True)
    assert (q["seconds"], q["timed"], len(runs)) == (plan_mod.REPEAT_BELOW + 1, 1, 1)


def _fake_passes(monkeypatch, seconds_per_row, fits_up_to=None):
    """``_timed_pass`` replaced: a pass of ``rows`` takes ``seconds_per_row(rows)`` and raises CUDA's out-of-memory
    error above ``fits_up_to`` rows. Returns the batches tried."""
    import interp.studies.plan as plan_mod

    tried = []

    def timed(model, plan, rows, grad, size=None):
        tried.append(rows)
        if fits_up_to is not None and rows > fits_up_to:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {rows} GiB")
        return {"rows": rows, "seconds": seconds_per_row(rows), "peak_bytes": rows}

    monkeypatch.setattr(plan_mod, "_timed_pass", timed)
    return tried


def test_a_fast_measured_pass_grows_toward_the_engine_batch(monkeypatch):
    """On a GPU a pass at the FLOP budget takes milliseconds: the measured batch grows (by the time it took) until a
    pass takes GROW_BELOW or reaches the engine's batch; a slow pass (a CPU at SD's size) is not grown."""
    import interp.studies.plan as plan_mod

    tried = _fake_passes(monkeypatch, lambda rows: 0.01 + 0.004 * rows)  # a GPU: batching pays
    q = plan_mod._fitting_pass(None, None, 1, 256, False)
    assert q["rows"] == 256 and q["oom_rows"] is None and tried[0] == 1 and 1 < tried[2] < 256, tried
    tried = _fake_passes(monkeypatch, lambda rows: 0.3 * rows)
    q = plan_mod._fitting_pass(None, None, 1, 256, False)
    assert q["rows"] == 6 and q["seconds"] >= plan_mod.GROW_BELOW, tried  # 1 (0.3 s) -> 3 (0.9 s) -> 6 (1.8 s)
    tried = _fake_passes(monkeypatch, lambda rows: 8.0 * rows)
    assert plan_mod._fitting_pass(None, None, 1, 256, True)["rows"] == 1 and set(tried) == {1}


@pytest.mark.slow  # several seconds: repeated measured passes
def test_a_pass_that_does_not_fit_is_halved_and_the_plan_names_the_batch(monkeypatch, capsys):
    """A GPU user's plan at the engine's 256 rows: the pass that does not fit is halved until one does, the plan
    projects at that batch and says which --max-batch to run with; a pass of one row that does not fit raises."""
    import interp.studies.plan as plan_mod
    from analyses.compare_methods import main

    tried = _fake_passes(monkeypatch, lambda rows: 0.001 * rows, fits_up_to=40)
    q = plan_mod._fitting_pass(None, None, 256, 256, False)
    assert (q["rows"], q["oom_rows"]) == (32, 64) and tried == [256, 128, 64, 32, 32], tried
    assert main(["--plan", "--concepts", "red", "--methods", "ablation", "cad", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "memory: a pass of 64 rows did not fit" in out and "run with --max-batch 32" in out, out
    _fake_passes(monkeypatch, lambda rows: 0.1, fits_up_to=0)
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate 1 GiB"):  # not even one row fits
        plan_mod._fitting_pass(None, None, 4, 4, False)


def test_the_plan_projects_gpu_memory_to_the_engine_batch_and_names_the_batch_that_fits(monkeypatch, capsys):
    """On CUDA a measured pass that stops short of the engine's batch (a pass took GROW_BELOW) tells what a pass
    holds per row above what was held before it: the plan projects the engine's batch from it and, when that would
    not fit in the device, says which --max-batch would, before anything runs."""
    import interp.studies.plan as plan_mod
    from analyses.compare_methods import main

    GiB = 2**30

    def timed(model, plan, rows, grad, size=None):  # a GPU holding 4 GiB of weights, 0.5 GiB per row
        return {"rows": rows, "seconds": 0.3 * rows, "peak_bytes": 4 * GiB + rows * GiB // 2, "base_bytes": 4 * GiB}

    monkeypatch.setattr(plan_mod, "_timed_pass", timed)
    monkeypatch.setattr(plan_mod, "_device_bytes", lambda device: 16 * GiB)
    q = plan_mod.project_memory(timed(None, None, 6, False), 256, 16 * GiB)
    assert q["projected_bytes"] == 4 * GiB + 128 * GiB and q["fitting_rows"] == 20  # (0.9 x 16 - 4) / 0.5
    assert plan_mod.project_memory({"rows": 6, "peak_bytes": 5 * GiB, "base_bytes": None}, 256, None) == {}
    assert main(["--plan", "--concepts", "red", "--methods", "ablation", "cad", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "peak allocated" in out and "at the engine's batch a forward pass of 256 rows would hold" in out and "run with --max-batch 20" in out, out
    monkeypatch.setattr(plan_mod, "_device_bytes", lambda device: 1024 * GiB)  # fits: nothing to say
    assert main(["--plan", "--concepts", "red", "--methods", "ablation", "cad", "--threads", "1"]) == 0
    assert "at the engine's batch" not in capsys.readouterr().out


def test_the_erasure_plan_counts_the_runs_unet_rows(tiny_world_folder, tmp_path, monkeypatch, capsys, no_figures):
    """``erasure_curves --plan``: the rows it counts (the rankings' methods, then every ablation set's held-out
    generation and J) equal the UNet rows the run executes, when no set repeats another."""
    from analyses import erasure_curves

    argv = ["--model", str(tiny_world_folder), "--concepts", "red", "--methods", "ablation", "--families", "ff",
            "--kinds", "ff.net.2", "--blocks", "mid_block", "--k", "1", "3", "--attr-images", "2", "--timesteps",
            "300", "--random-rankings", "1", "--random-masks", "2", "--mask-rates", "0.5", "--images", "4", "--steps",
            "2", "--n-boot", "100", "--no-progress", "--threads", "1"]
    parser = erasure_curves.build_parser()
    args = parser.parse_args([*argv, "--out", str(tmp_path / "run")])
    cfg, compare = erasure_curves.check_args(parser, args)
    model = interp.load_model(str(tiny_world_folder))
    plan = erasure_curves.plan(cfg, compare, model)
    assert model.counters["unet_rows"] == 0, "the plan's measured passes must not count as work"
    t = plan.table.set_index("method")
    assert {"ablation", "erasure: generations", "erasure: J"} <= set(t.index) and "heldout@0.2" not in t.index
    sets = 1 + (1 + 1) * 2 + 2  # the unedited model; ablation's and one random order's top 1 and 3; two masks
    assert t.loc["erasure: generations", "unet_rows"] == sets * 4 * 2  # images x steps (the tiny world: unguided)
    assert t.loc["erasure: J", "unet_rows"] == (1 + sets) * plan.shape.rows_per_eval  # its intact J, then the sets
    monkeypatch.setattr(interp.core.models, "load_model", lambda *a, **k: model)
    assert erasure_curves.main([*argv, "--out", str(tmp_path / "run")]) == 0
    assert model.counters["unet_rows"] == plan.table["unet_rows"].sum()  # no two sets alike: the count is exact
    assert erasure_curves.main([*argv, "--plan"]) == 0  # the command prints it and runs nothing
    assert "erasure: generations" in capsys.readouterr().out
