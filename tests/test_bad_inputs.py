"""Hostile but realistic inputs and faults (issue 16): every one ends in a clear error naming the problem, or in a
correct recovery (recomputed with a warning naming the file, tables identical to a clean run); none in a report
marked complete with wrong numbers. Tiny configurations: one concept, the mid block, few masks."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import Killed, killed_at_second_masked_call

import interp
from interp.core.objectives import Objective, ObjectiveConfig
from interp.core.store import CacheWarning, Store

MID = "unet.mid_block.attentions.0.transformer_blocks.0"


@pytest.fixture(scope="module")
def world(tiny_world_folder) -> Path:
    return tiny_world_folder


def small_args(world: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(world), "--concepts", "red", "--images", "2", "--timesteps", "300", "--blocks",
            "mid_block", "--methods", "ablation", "cad", "coar", "--coar-masks", "20", "--heldout-masks", "10",
            "--lds-alphas", "0.05", "--n-boot", "100", "--device", "cpu", "--no-progress", "--threads", "1",
            "--out", str(out), *extra]


def methods_started(out: Path) -> list[str]:
    cache = out / "cache"
    return [p.name for p in cache.iterdir() if not p.name.startswith("heldout")] if cache.exists() else []


# -- bad values on the command line: refused before any method runs, one line naming the option ----------------------
CLI_CASES = {
    "negative timestep": (["--timesteps", "-5"], "timesteps"),
    "timestep beyond the scheduler": (["--timesteps", "5000"], "timesteps [5000] are outside"),
    "threads 0": (["--threads", "0"], "--threads"),
    "one held-out mask": (["--heldout-masks", "1"], "heldout_masks"),
    "two held-out masks": (["--heldout-masks", "2"], "heldout_masks"),
    "negative held-out masks": (["--heldout-masks", "-5"], "heldout_masks"),
    "held-out masks beyond memory": (["--heldout-masks", "2000000000"], "held-out masks"),
    "images beyond memory": (["--images", "100000000"], "evaluation set"),
    "batch 0": (["--max-batch", "0"], "max_batch"),
    "too few COAR masks": (["--coar-masks", "5"], "--coar-masks 5"),
    "rate above 1": (["--maskgrad-alpha", "1.5"], "--maskgrad-alpha 1.5"),
    "LDS rate 0": (["--lds-alphas", "0"], "LDS ablation rates"),
    "bootstrap 0": (["--n-boot", "0"], "n_boot"),
    "negative seed": (["--seed", "-1"], "seed"),
    "unknown concept word": (["--concepts", "magenta"], "magenta"),
    "empty concept word": (["--concepts", " "], "non-empty"),
    "two erasure images": (["--erasure-k", "1", "--erasure-images", "2"], "--erasure-images"),
    "erasure steps 0": (["--erasure-k", "1", "--erasure-steps", "0"], "--erasure-steps"),
    "alternatives on the concept world": (["--alternatives", "blue"], "alternatives are for models other"),
    "duplicate alternatives": (["--alternatives", "blue", "blue"], "--alternatives"),
    "the concept its only alternative": (["--alternatives", "red"], "nothing to be weighed against"),
    "no reference method": (["--methods", "cad"], "ablation"),
    "unknown method": (["--methods", "ablation", "nosuch"], "nosuch"),
    "empty component selection": (["--families", "ff", "--kinds", "attn2.to_q"], "component set is empty"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_bad_values_before_work(case, world, tmp_path, refused):
    from analyses.compare_methods import main

    extra, needle = CLI_CASES[case]
    out = tmp_path / "run"
    line = refused(main, small_args(world, out, *extra))
    assert needle in line, line
    assert methods_started(out) == [], "a method ran before the bad value was refused"
    assert not (out / "index.html").exists()
    if (out / "status.json").exists():
        assert json.loads((out / "status.json").read_text())["status"] == "failed"


def test_unknown_concept_is_refused_before_the_model_loads(world, tmp_path, refused, monkeypatch):
    from analyses.compare_methods import main

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(interp.core.models, "load_model", no_loading)
    line = refused(main, small_args(world, tmp_path / "run", "--concepts", "red", "magenta"))
    assert "magenta" in line


def test_coar_with_ten_masks_needs_no_budget_curve():
    from interp.methods.base import get
    from interp.studies.compare import CompareConfig

    opts = CompareConfig(options={"coar": {"n_masks": 10}}).method_options("coar", 32)
    assert opts["n_masks"] == 10 and opts["curve"] == ()  # 8 training masks: no curve point of >= 10 fits below
    assert get("coar")(**opts).config.curve == ()
    for masks in (13, 20, 200):  # every curve point a comparison asks for is one COAR's fit accepts
        opts = CompareConfig(options={"coar": {"n_masks": masks}}).method_options("coar", 32)
        assert all(10 <= k < int(masks * 0.8) for k in opts["curve"]), (masks, opts)


def test_out_that_is_a_file(world, tmp_path, refused):
    from analyses.compare_methods import main

    f = tmp_path / "a-file"
    f.write_text("x")
    assert "existing file" in refused(main, small_args(world, f))
    assert f.read_text() == "x"


#: ``compare_methods --help`` in a fresh interpreter: its text, and which heavy libraries it imported.
HELP = r"""
import contextlib, io, json, runpy, sys
sys.argv = ["compare_methods", "--help"]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        runpy.run_module("analyses.compare_methods", run_name="__main__")
    except SystemExit as e:
        code = e.code
world = [m for m in sys.modules if m.startswith("interp.world")]
print(json.dumps({"code": code, "help": out.getvalue(), "world": world}))
"""


def test_help_documents_every_field_and_every_methods_option():
    """--help documents every option: the config's fields and each registered method's options (read from the
    method's own file); the concept world is not loaded for it (benchmarks/bench_cli_help.py times --help)."""
    import subprocess
    import sys
    from dataclasses import fields

    from interp.methods import REGISTRY
    from interp.studies.compare_config import CompareConfig

    got = json.loads(subprocess.run([sys.executable, "-c", HELP], capture_output=True, text=True, check=True,
                                    cwd=Path(__file__).resolve().parents[1]).stdout)
    assert got["code"] in (0, None) and got["world"] == [], got["world"]
    text = got["help"]
    for f in fields(CompareConfig):
        if f.name == "options":  # the methods' flags stand for it
            continue
        flag = (f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),))[0]
        assert flag in text and f.metadata["help"].split()[0] in text, f.name
    for name, cls in REGISTRY.items():
        for f in cls.command_options():
            assert cls.flag(f) in text and f.metadata["help"].split()[0] in text, (name, f.name)


# -- corrupt files and failures of the machine: one line naming the file, status failed, traceback kept -------------
def broken_copy(world: Path, tmp_path: Path, fault: str) -> tuple[Path, str]:
    d = tmp_path / "model"
    shutil.copytree(world, d)
    unet = d / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    if fault == "truncated safetensors":
        unet.write_bytes(unet.read_bytes()[: unet.stat().st_size // 2])
        return d, str(unet)
    if fault == "random-bytes safetensors":
        unet.write_bytes(np.random.default_rng(0).bytes(4096))
        return d, str(unet)
    if fault == "malformed model_index.json":
        (d / "pipeline" / "model_index.json").write_text('{"_class_name": ')
        return d, str(d / "pipeline" / "model_index.json")
    if fault == "NaN weights":
        from safetensors.torch import load_file, save_file

        state = load_file(unet)
        name = sorted(state)[3]
        state[name] = torch.full_like(state[name], float("nan"))
        save_file(state, unet)
        return d, "non-finite"
    raise KeyError(fault)


@pytest.mark.parametrize("fault", ["truncated safetensors", "random-bytes safetensors", "malformed model_index.json",
                                   "NaN weights"])
def test_corrupt_model_files_are_named(fault, world, tmp_path, refused):
    from analyses.compare_methods import main

    model, needle = broken_copy(world, tmp_path, fault)
    out = tmp_path / "run"
    line = refused(main, small_args(model, out))
    assert needle in line, line
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and status["error"]
    assert "Traceback" in (out / "traceback.txt").read_text()


@pytest.mark.parametrize("code, needle", [(errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full"),
                                          (errno.EACCES, "no permission")])
def test_unwritable_run_folder(code, needle, world, tmp_path, refused, monkeypatch):
    """A read-only, full or forbidden filesystem (simulated: the tests run as root, for whom chmod is no barrier)."""
    import os

    from analyses.compare_methods import main

    def failing(path, text):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(interp.core.runs, "atomic_write_text", failing)
    out = tmp_path / "run"
    line = refused(main, small_args(world, out))
    assert needle in line and str(out) in line, line


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_a_pass_that_does_not_fit_in_memory_names_the_fix(device, world, tmp_path, refused, monkeypatch):
    """A GPU user's first run at SD's 64x64 latents may not fit 256 rows per pass: the UNet's out-of-memory error
    (CUDA's ``torch.OutOfMemoryError``, simulated; the CPU allocator's, real) becomes one line naming --max-batch,
    and the run folder is marked failed with the traceback."""
    from diffusers import UNet2DConditionModel

    from analyses.compare_methods import main

    if device == "cuda":
        error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity "
                                       "of 23.65 GiB of which 1.2 GiB is free.")
    else:
        try:
            torch.empty(10**13)  # 40 TB: refused by the CPU allocator at once
        except RuntimeError as err:
            error = err
    forward = UNet2DConditionModel.forward

    def too_big(self, sample, *args, **kwargs):
        if sample.shape[0] > 1:  # the batched passes, not the plan's or the warm-up's single rows
            raise error
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", too_big)
    out = tmp_path / "run"
    line = refused(main, small_args(world, out))
    assert "out of memory" in line and "--max-batch" in line, line
    assert ("CUDA out of memory" if device == "cuda" else "can't allocate memory") in line, line
    assert json.loads((out / "status.json").read_text())["status"] == "failed"
    assert not (out / "index.html").exists()


# -- the library: values refused on construction -------------------------------------------------------------------
def test_library_refuses_bad_values(tiny_world_model):
    from interp.core.concepts import Concept
    from interp.methods.base import get
    from interp.studies.compare import CompareConfig

    bad = {  # the value and what its refusal must say
        "negative timestep": (lambda: ObjectiveConfig(timesteps=(-1,)), "timesteps must be an integer >= 0, got -1"),
        "timesteps as one int": (lambda: ObjectiveConfig(timesteps=300),
                                 "timesteps must be a non-empty sequence of integers, got 300"),
        "timestep beyond the scheduler": (
            lambda: Objective(tiny_world_model, "red", ObjectiveConfig(timesteps=(5000,))),
            r"timesteps \[5000\] are outside the scheduler's training range 0\.\.999"),
        "midpoint alpha -1": (lambda: get("midpoint")(alpha=-1), r"MidpointConfig: alpha .* in \(0, 1\), got -1"),
        "midpoint alpha 2": (lambda: get("midpoint")(alpha=2), r"MidpointConfig: alpha .* in \(0, 1\), got 2"),
        "ig steps 0": (lambda: get("ig")(steps=0), "IGConfig: steps must be an integer >= 1, got 0"),
        "cad n_groups 0": (lambda: get("cad")(n_groups=0), "CADConfig: n_groups must be an integer >= 1, got 0"),
        "ablation chunk 0": (lambda: get("ablation")(chunk=0), "AblationConfig: chunk must be an integer >= 1, got 0"),
        "coar chunk 0": (lambda: get("coar")(chunk=0), "COARConfig: chunk must be an integer >= 1, got 0"),
        "prompts as plain strings": (lambda: Concept("red", "a red circle", "a circle"),
                                     "target_prompts must be a sequence of strings, got the string 'a red circle'"),
        "empty target prompt": (lambda: Concept("red", ("",), ("",)), r"target prompts \[0\] are empty"),
        "concepts as a plain string": (lambda: CompareConfig(concepts="red"),
                                       "concepts must be a sequence of str values, got 'red'"),
        "held-out masks for an LDS": (lambda: CompareConfig(heldout_masks=2), "heldout_masks .* must be >= 10"),
        "count as a float": (lambda: CompareConfig(n_images=2.5), r"n_images must be an int, got 2\.5"),
    }
    for name, (make, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            make()
            pytest.fail(f"accepted: {name}")


@pytest.mark.parametrize("components", [{}, []])
def test_empty_component_selection_is_an_error(components, tiny_world_model, tiny_red_objective):
    with pytest.raises(ValueError, match="empty|nothing"):
        interp.attribute("cad", tiny_world_model, "red", components, objective=tiny_red_objective)


def test_objective_given_as_a_kind(tiny_world_model):
    comps = [f"{MID}.ff.net.2[{j}]" for j in range(4)]
    a = interp.attribute("cad", tiny_world_model, "red", comps, objective="erase")
    b = interp.attribute("cad", tiny_world_model, "red", comps, objective=ObjectiveConfig(kind="erase"))
    np.testing.assert_array_equal(a["score"].to_numpy(), b["score"].to_numpy())


# -- the cache: a broken item is recomputed with a warning naming it; never reused stale ----------------------------
def _ablation(model, obj, store, **kw):
    comps = model.components("neuron", kind="ff.net.0", layer="mid.a0.tb0")[:24]
    return interp.attribute("ablation", model, obj.concept, comps, objective=obj, store=store, chunk=8, **kw)


def _corrupt(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])
    elif how == "garbage":
        path.write_bytes(b"\x00not what was written\xff")
    elif how == "delete":
        path.unlink()
    elif how == "zeros":  # a chunk that loads but holds other values
        record = torch.load(path, weights_only=True)
        record["data"] = {k: torch.zeros_like(v) for k, v in record["data"].items()}
        torch.save(record, path)


@pytest.mark.parametrize("target, how", [("result.parquet", "truncate"), ("result.parquet", "garbage"),
                                         ("result.parquet", "delete"), ("meta.json", "truncate"),
                                         ("meta.json", "garbage"), ("chunk", "truncate"), ("chunk", "garbage"),
                                         ("chunk", "zeros")])
def test_broken_cache_items_are_recomputed(target, how, tiny_world_model, tiny_red_objective, tmp_path):
    m, obj = tiny_world_model, tiny_red_objective
    fresh = _ablation(m, obj, None)
    _ablation(m, obj, tmp_path)
    (entry,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    if target == "chunk":  # a run killed after some chunks, before its result: the resumed run reads them
        (entry / "result.parquet").unlink()
        (entry / "meta.json").unlink()
        path = sorted((entry / "chunks").glob("*.pt"))[1]
    else:
        path = entry / target
    _corrupt(path, how)
    with pytest.warns(CacheWarning, match=path.name):
        again = _ablation(m, obj, tmp_path)
    np.testing.assert_array_equal(again["score"].to_numpy(), fresh["score"].to_numpy())
    np.testing.assert_array_equal(again["stderr"].to_numpy(), fresh["stderr"].to_numpy())
    for k in ("forward_evals", "backward_evals"):  # passes, not wall time
        assert again.attrs["meta"]["cost"][k] == fresh.attrs["meta"]["cost"][k], k


def test_resumed_run_reports_the_whole_cost(tiny_world_model, tiny_red_objective, tmp_path, monkeypatch):
    m, obj = tiny_world_model, tiny_red_objective
    scratch = _ablation(m, obj, None)

    killed_at_second_masked_call(monkeypatch)
    with pytest.raises(Killed):
        _ablation(m, obj, tmp_path)
    monkeypatch.undo()
    rows0 = m.counters["unet_rows"]
    resumed = _ablation(m, obj, tmp_path)
    assert m.counters["unet_rows"] - rows0 < scratch.attrs["meta"]["cost"]["forward_evals"] * obj.rows_per_eval  # resumed
    for k in ("forward_evals", "backward_evals"):
        assert resumed.attrs["meta"]["cost"][k] == scratch.attrs["meta"]["cost"][k], k


def test_heldout_cache_key_uses_every_component_and_the_weights(tiny_world_model, tiny_red_objective, tmp_path,
                                                                 tiny_world_model_factory):
    """Issue 16's stale reuse: two component sets with the same first three addresses and count; a retrained model."""
    from interp.core.components import ComponentSet
    from interp.studies.compare import heldout_ablations

    m, obj = tiny_world_model, tiny_red_objective
    units = m.components("neuron", kind="ff.net.0", layer="mid.a0.tb0")
    a = ComponentSet([units[i] for i in range(3)] + [units[i] for i in range(3, 13)])
    b = ComponentSet([units[i] for i in range(3)] + [units[i] for i in range(20, 30)])
    store = Store(tmp_path)
    ja = heldout_ablations(obj, a, 0.2, 10, 0, store)["j"]
    jb = heldout_ablations(obj, b, 0.2, 10, 0, store)["j"]
    np.testing.assert_array_equal(jb, heldout_ablations(obj, b, 0.2, 10, 0, Store(None))["j"])
    assert not np.array_equal(ja, jb)
    other = tiny_world_model_factory(seed=1)  # "retrained": same architecture and addresses, other weights
    o = Objective(other, "red", obj.config)
    jo = heldout_ablations(o, a, 0.2, 10, 0, store)["j"]
    np.testing.assert_array_equal(jo, heldout_ablations(o, a, 0.2, 10, 0, Store(None))["j"])


@pytest.mark.parametrize("how", ["truncate", "garbage", "delete"])
def test_broken_derived_files_are_recomputed(how, tmp_path):
    store = Store(tmp_path)
    files = {"tables/t.parquet": b"table bytes", "figures/f.png": b"png bytes"}
    store.entry("derived", {"x": 1}).save_files(files)
    assert store.entry("derived", {"x": 1}).load_files() == files
    assert store.entry("derived", {"x": 2}).load_files() is None  # another key: nothing to reuse
    victim = next(tmp_path.glob("derived-*/tables/t.parquet"))
    _corrupt(victim, how)
    with pytest.warns(CacheWarning, match="t.parquet"):
        assert store.entry("derived", {"x": 1}).load_files() is None


# -- the run folder holds one run's outputs; a failed run says so -------------------------------------------------
def _finished_folder(out: Path) -> None:
    for rel in ("index.html", "results.parquet", "meta.json", "edits.json", "tables/old.csv", "figures/old.png"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("from an earlier run")
    (out / "cache" / "kept").mkdir(parents=True)
    (out / "status.json").write_text(json.dumps({"status": "complete"}))


def test_failed_rerun_leaves_no_earlier_outputs(tmp_path):
    from interp.core.runs import Run

    out = tmp_path / "run"
    _finished_folder(out)
    with pytest.raises(RuntimeError, match="boom"):
        with Run(out, {"concepts": ["blue"]}, "edit"):
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["cache", "status.json", "traceback.txt"]
    assert (out / "cache" / "kept").is_dir()  # content-addressed: safe to keep
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and "boom" in status["error"]
    assert "RuntimeError: boom" in (out / "traceback.txt").read_text()


def test_edit_cli_failure_into_a_finished_folder(world, tmp_path, refused):
    from analyses.edit_concepts import main

    model, _ = broken_copy(world, tmp_path, "NaN weights")
    out = tmp_path / "edits"
    _finished_folder(out)
    line = refused(main, ["--model", str(model), "--concepts", "blue", "--out", str(out), "--device", "cpu"])
    assert "non-finite" in line
    assert not any((out / n).exists() for n in ("index.html", "edits.json", "meta.json", "tables", "figures"))
    assert json.loads((out / "status.json").read_text())["status"] == "failed"


def test_foreign_folder_is_refused(world, tmp_path, refused):
    from analyses.compare_methods import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file")
    assert "no run of this suite" in refused(main, small_args(world, out))
    assert (out / "notes.txt").read_text() == "a user's file"


@pytest.mark.slow  # several seconds: two comparison runs
def test_rerun_with_another_concept_clears_the_old_outputs(world, tmp_path, no_figures):
    from analyses.compare_methods import main

    out = tmp_path / "run"
    assert main(small_args(world, out)) == 0
    old = {p.name for p in (out / "figures").iterdir()}
    assert any("red" in n for n in old)
    assert main(small_args(world, out, "--concepts", "circle")) == 0
    new = {p.name for p in (out / "figures").iterdir()}
    assert not any("red" in n for n in new) and any("circle" in n for n in new)
    assert set(pd.read_parquet(out / "results.parquet")["concept"]) == {"circle"}
    assert json.loads((out / "status.json").read_text())["status"] == "complete"


@pytest.mark.slow  # several seconds: two comparison runs
def test_reused_out_with_other_blocks_matches_a_fresh_folder(world, tmp_path, no_figures):
    """Issue 16's stale held-out reuse, end to end: blocks {down_blocks.1, mid_block}, then {down_blocks.1,
    down_blocks.2} into the same folder; the second run's tables equal a fresh folder's (same count, same first
    addresses)."""
    from analyses.compare_methods import main

    def args(out, *blocks):
        a = small_args(world, out)
        i = a.index("--blocks")
        return a[:i] + ["--blocks", *blocks] + a[i + 2:]

    shared, fresh = tmp_path / "shared", tmp_path / "fresh"
    assert main(args(shared, "down_blocks.1", "mid_block")) == 0
    assert main(args(shared, "down_blocks.1", "down_blocks.2")) == 0
    assert main(args(fresh, "down_blocks.1", "down_blocks.2")) == 0
    for name in ("lds.csv", "correlations.csv", "accuracy_vs_cost.csv"):
        assert (shared / "tables" / name).read_text() == (fresh / "tables" / name).read_text(), name


def test_cache_keys_name_the_device_and_the_judges_weights(tiny_world_folder):
    """Objective.identity keys every cached result: it changes with the judge's weights (a judge retrained in place
    must not reuse its predecessor's values) and names the device."""
    model = interp.load_model(str(tiny_world_folder), device="cpu")
    obj = Objective(model, "red", ObjectiveConfig(kind="classifier", n_images=1, gen_steps=2))
    before = obj.identity()
    assert before["device"] == "cpu" and before["judge"] is not None
    w = next(model.classifier.parameters())
    with torch.no_grad():
        w.add_(1.0)
    try:
        assert obj.identity()["judge"] != before["judge"]
        assert obj.identity()["model"] == before["model"]
    finally:
        with torch.no_grad():
            w.sub_(1.0)
    erase = Objective(model, "red", ObjectiveConfig(n_images=1, timesteps=(300,)))
    assert erase.identity()["judge"] is None


@pytest.mark.slow  # several seconds: a run behind a simulated accelerator
def test_on_an_accelerator_the_largest_passes_are_tried_before_any_method(world, tmp_path, refused, monkeypatch,
                                                                          no_figures):
    """On a GPU the run first tries one forward and one forward+backward pass at the largest batches it will make:
    a batch the device cannot hold fails in seconds, one line naming the --max-batch that fits, before any method
    has run (max_batch keys every cache, so a run restarted with another starts over). GPU and its out-of-memory
    error simulated: every UNet pass of more than 4 rows raises CUDA's error."""
    from diffusers import UNet2DConditionModel

    import interp.studies.plan as plan_mod
    from analyses.compare_methods import main

    forward = UNet2DConditionModel.forward
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.")
    passes = []

    def small_gpu(self, sample, *args, **kwargs):
        passes.append(sample.shape[0])
        if sample.shape[0] > 4:
            raise error
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(plan_mod, "memory_bounded", lambda model: True)
    monkeypatch.setattr(UNet2DConditionModel, "forward", small_gpu)
    out = tmp_path / "run"
    line = refused(main, small_args(world, out))
    # the evaluation set is 2 images x 1 timestep x 2 branches = 4 rows: the objectives fit; the sweeps' batches do not
    assert "before any method ran" in line and "run with --max-batch 4" in line, line
    # the largest sweep: 2 x 16 mid-block neurons' masks x 4 rows; a gradient pass: 4 masks x 2 branches x 2 samples
    assert "(forward: 128 UNet rows, forward+backward: 16 UNet rows; 4 rows fit, beside the replay cache's" in line, line
    assert methods_started(out) == [] and json.loads((out / "status.json").read_text())["status"] == "failed"
    passes.clear()
    out = tmp_path / "fits"
    assert main(small_args(world, out, "--max-batch", "4")) == 0  # what the line says works, and is tried first
    assert passes and max(passes) <= 4 and json.loads((out / "status.json").read_text())["status"] == "complete"


def test_on_an_accelerator_the_replay_cache_is_held_while_the_largest_passes_are_tried(world, tmp_path, refused,
                                                                                      monkeypatch, no_figures):
    """Prefix replay's cache (the intact outputs upstream of the ablated units, up to its budget) lives on the
    device beside the sweeps' passes, so the preflight holds as much while it tries them; a cache that cannot fit
    at all is one line before any method runs. The allocator's error is real: a 40 TB reservation."""
    import interp.studies.plan as plan_mod
    from analyses.compare_methods import main

    asked = []
    real = plan_mod.replay_reserve

    def reserve(*args):
        asked.append(real(*args))
        return asked[-1]

    monkeypatch.setattr(plan_mod, "memory_bounded", lambda model: True)
    monkeypatch.setattr(plan_mod, "replay_reserve", reserve)
    assert main(small_args(world, tmp_path / "fits")) == 0
    assert asked and asked[0] > 0
    monkeypatch.setattr(plan_mod, "replay_reserve", lambda *args: 40 * 2**40)
    out = tmp_path / "run"
    line = refused(main, small_args(world, out))
    assert "replay cache" in line and "--images" in line and "before any method ran" in line, line
    assert methods_started(out) == []


@pytest.mark.parametrize("command", ["edit_concepts", "erasure_curves"])
def test_the_other_long_commands_try_their_largest_passes_first_on_an_accelerator(command, world, tmp_path, refused,
                                                                                     monkeypatch):
    """edit_concepts and erasure_curves also try their largest passes (their methods' gradients included) before any
    work on an accelerator, and name the --max-batch that fits (GPU and out-of-memory error simulated)."""
    import importlib

    from diffusers import UNet2DConditionModel

    import interp.studies.plan as plan_mod

    main = importlib.import_module(f"analyses.{command}").main
    forward = UNet2DConditionModel.forward

    def small_gpu(self, sample, *args, **kwargs):
        if sample.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.")
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(plan_mod, "memory_bounded", lambda model: True)
    monkeypatch.setattr(UNet2DConditionModel, "forward", small_gpu)
    common = ["--model", str(world), "--concepts", "red", "--threads", "1", "--no-progress", "--out",
              str(tmp_path / "run")]
    args = {"edit_concepts": ["--edits", "cad-erase", "--images", "3", "--steps", "1", "--attr-images", "2"],
            "erasure_curves": ["--methods", "cad", "--blocks", "mid_block", "--k", "1", "--images", "3", "--steps",
                               "1", "--random-rankings", "1", "--random-masks", "1", "--n-boot", "100",
                               "--attr-images", "2", "--timesteps", "300"]}[command]
    line = refused(main, [*common, *args])
    fits = re.search(r"run with --max-batch (\d+)", line)
    assert "checked before any method ran" in line and fits and 1 <= int(fits.group(1)) <= 4, line  # halved to fit
    assert "forward+backward" in line, line  # CAD's gradients were tried
