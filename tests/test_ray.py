"""The Ray executor on a local 2-CPU cluster started by the tests: every sweep gives the local executor's results bit
for bit, a killed worker costs only its items, and workers that cannot be placed fail instead of waiting (the whole
comparison, and a killed driver, are in test_ray_slow.py).

Every test that uses the cluster is ``slow`` (CI runs the slow tier too): starting the cluster and its workers, which
load the model, is most of their ~70 s on two cores. The executor's option checks, which start nothing, stay fast.

Ray is an optional extra (``pip install -e '.[ray]'``, which ``.ci/run`` installs): without it these tests skip,
except under ``CI=true``, where a skip would hide that the executor was never tested.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pandas as pd
import pytest
from helpers import require_ray

ROOT = Path(__file__).resolve().parents[1]

require_ray()

# Under pytest-xdist (`--dist loadgroup`), every Ray test runs on one worker: one local cluster at a time.
pytestmark = pytest.mark.xdist_group("ray")

#: Methods and options small enough for the tiny model, each with several chunks so that both workers get items.
METHODS = {
    "ablation": {"chunk": 8},
    "coar": {"n_masks": 40, "chunk": 8},
    "maskgrad": {"n_masks": 4, "batch": 2},
    "ig": {"steps": 4, "batch": 2},
    "midpoint": {},
    "screen": {"fraction": 0.25, "screen_options": (("n_masks", 4), ("batch", 2))},
    "tracing": {"n_noise": 1, "chunk": 8, "maps": False},
}


@pytest.fixture(scope="module")
def ray_executor():
    from interp.core.executors import RayExecutor

    ex = RayExecutor(workers=2)
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def tiny_loaded(tiny_world_folder):
    """The tiny concept world loaded from its folder, as a user's model is (workers load it the same way)."""
    import interp

    return interp.load_model(str(tiny_world_folder), device="cpu")


def _objective(model):
    from interp.core.objectives import Objective, ObjectiveConfig

    return Objective(model, "red", ObjectiveConfig(n_images=2, timesteps=(300, 700)))


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_sweep_gives_the_local_result_bit_for_bit(method, tiny_loaded, ray_executor, tmp_path):
    import interp
    from interp.core.store import Store

    comps = tiny_loaded.components("neuron", family="ff", kind="ff.net.2", block="mid_block")
    # A fresh objective for each run: J caches intact states on first use, which the first run would pay for.
    local = interp.attribute(method, tiny_loaded, "red", comps, objective=_objective(tiny_loaded), **METHODS[method])
    before = dict(tiny_loaded.counters)
    remote = interp.attribute(method, tiny_loaded, "red", comps, objective=_objective(tiny_loaded),
                              store=Store(tmp_path), executor=ray_executor, **METHODS[method])
    pd.testing.assert_frame_equal(local, remote)
    for k in ("forward_evals", "backward_evals"):  # the workers' passes are counted where the run is recorded
        assert local.attrs["meta"]["cost"][k] == remote.attrs["meta"]["cost"][k], k
    assert remote.attrs["meta"]["cost"]["forward_evals"] > 0 or method == "midpoint"
    chunks = list(tmp_path.glob("*/chunks/*.pt"))
    assert chunks, "the driver writes every item the workers return into the store"
    # Read back from the store, on the local executor: nothing is recomputed.
    tiny_loaded.counters.clear()
    tiny_loaded.counters.update(before)
    again = interp.attribute(method, tiny_loaded, "red", comps, objective=_objective(tiny_loaded),
                             store=Store(tmp_path), **METHODS[method])
    pd.testing.assert_frame_equal(local, again)


@pytest.mark.slow
@pytest.mark.parametrize("style", ["sd1", "sd2"])  # PNDM + epsilon; DDIM + v-prediction
def test_stable_diffusion_folders_give_the_local_result_on_ray(style, ray_executor, tmp_path):
    """On a Stable Diffusion folder the workers rebuild the evaluation set by sampling with the folder's scheduler:
    forward and gradient sweeps equal the local ones."""
    import interp
    from interp.core.objectives import ObjectiveConfig
    from interp.testing import tiny_stable_diffusion

    model = interp.load_model(tiny_stable_diffusion(tmp_path / style, style), device="cpu")
    comps = model.components("neuron", family="ff", kind="ff.net.2", block="down_blocks.0")
    ocfg = ObjectiveConfig(n_images=2, gen_steps=3, timesteps=(100, 700))
    for method, options in (("ablation", {"chunk": 4}), ("maskgrad", {"n_masks": 4, "batch": 2})):
        local = interp.attribute(method, model, "red", comps, objective=ocfg, **options)
        remote = interp.attribute(method, model, "red", comps, objective=ocfg, executor=ray_executor, **options)
        pd.testing.assert_frame_equal(local, remote)
        assert local.attrs["meta"]["cost"]["forward_evals"] == remote.attrs["meta"]["cost"]["forward_evals"]


@pytest.mark.slow
def test_features_give_the_local_result_on_ray(tiny_loaded, ray_executor):
    """Feature components on Ray: the workers attach the driver's sparse autoencoders, so ablation and the
    mask-averaged gradient of features equal the local runs; another SAE at the same site is another job (a worker
    never reuses the first one's state)."""
    import torch

    import interp
    from interp.core.features import attach, detach, planted

    site = "unet.mid_block.attentions.0.transformer_blocks.0.ff"  # (B, tokens, 16) on the tiny world
    d = 16
    results = []
    try:
        for seed in (0, 1):
            q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
            attach(tiny_loaded, planted(site, torch.cat([q, -q])[:12], k=4))
            comps = tiny_loaded.components("feature")
            for method, options in (("ablation", {"chunk": 4}), ("maskgrad", {"n_masks": 4, "batch": 2})):
                local = interp.attribute(method, tiny_loaded, "red", comps, objective=_objective(tiny_loaded),
                                         **options)
                remote = interp.attribute(method, tiny_loaded, "red", comps, objective=_objective(tiny_loaded),
                                          executor=ray_executor, **options)
                pd.testing.assert_frame_equal(local, remote)
                results.append(remote["score"].to_numpy())
    finally:
        detach(tiny_loaded, site)
    assert not (results[0] == results[2]).all()  # the second SAE's features are other components


@pytest.mark.slow
def test_a_killed_worker_costs_only_its_items(tiny_loaded, ray_executor, tmp_path, monkeypatch):
    """SIGKILL one worker while a sweep runs: Ray restarts it (it loads the model again) and retries its items; the
    result is the uninterrupted one and every item is stored once."""
    import interp
    from interp.core.store import Entry, Store

    comps = tiny_loaded.components("neuron", family="ff", kind="ff.net.2")
    obj = _objective(tiny_loaded)
    local = interp.attribute("ablation", tiny_loaded, "red", comps, objective=obj, chunk=2)
    ray_executor.actors(__import__("interp.core.executors", fromlist=["x"]).ObjectiveRecipe.of(obj))
    pids = ray_executor.worker_pids()
    killed = {}
    put_chunk = Entry.put_chunk

    def kill_at_first_item(self, key, out, counters):
        """The driver stores every item a worker returns: the worker is killed when the first is stored, in the
        driver's own thread, so the sweep cannot finish first (a watcher thread polling the folder could lose that
        race)."""
        put_chunk(self, key, out, counters)
        if not killed:
            os.kill(pids[0], signal.SIGKILL)
            killed["at"] = len(list(tmp_path.glob("*/chunks/*.pt")))

    monkeypatch.setattr(Entry, "put_chunk", kill_at_first_item)
    remote = interp.attribute("ablation", tiny_loaded, "red", comps, objective=obj, store=Store(tmp_path),
                              executor=ray_executor, chunk=2)
    monkeypatch.undo()
    n_chunks = (len(comps) + 1) // 2
    assert killed == {"at": 1} and n_chunks > 1
    pd.testing.assert_frame_equal(local, remote)
    assert remote.attrs["meta"]["cost"]["forward_evals"] == local.attrs["meta"]["cost"]["forward_evals"]
    assert len(list(tmp_path.glob("*/chunks/*.pt"))) == n_chunks
    new_pids = ray_executor.worker_pids()
    assert pids[0] not in new_pids and pids[1] in new_pids, "the killed worker was restarted, the other kept"


@pytest.mark.slow
def test_the_ray_executor_refuses_a_model_it_cannot_reload(tiny_world_model, ray_executor):
    import interp

    comps = tiny_world_model.components("neuron", family="ff", kind="ff.net.2", block="mid_block")
    with pytest.raises(ValueError, match="save_pretrained this pipeline to a folder"):
        interp.attribute("ablation", tiny_world_model, "red", comps, objective=_objective(tiny_world_model),
                         executor=ray_executor)


@pytest.mark.slow
def test_workers_that_cannot_be_placed_fail_instead_of_waiting(tiny_loaded, ray_executor):
    """The module's executor holds both CPUs of the local cluster: a second one asking for two more workers gets a
    one-line error naming the fix, not a hang."""
    from interp.core.executors import ObjectiveRecipe, RayExecutor

    recipe = ObjectiveRecipe.of(_objective(tiny_loaded))
    ray_executor.actors(recipe)
    with pytest.raises(RuntimeError, match="close the other RayExecutor"):
        RayExecutor(workers=2, placement_timeout=1).actors(recipe)


def test_executor_options_are_checked_before_work(tiny_world_folder, tmp_path, refused):
    from analyses.compare_methods import main

    assert "pass executor='ray'" in refused(main, ["--model", str(tiny_world_folder), "--ray-address", "auto",
                                                   "--out", str(tmp_path / "r")])
    assert "workers must be >= 1" in refused(main, ["--model", str(tiny_world_folder), "--executor", "ray",
                                                    "--ray-workers", "0", "--out", str(tmp_path)])
    assert not (tmp_path / "r").exists()
