"""The whole comparison on a local 2-CPU Ray cluster (``slow``): the local run's tables byte for byte, and a Ray run
whose driver is killed -9 midway resumes from the store. In its own module so that no other test's Ray cluster
holds the CPUs its workers need (a module-scoped executor lives until its module ends)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_same_tables, killed_compare_run, require_ray
from helpers import compare_args as _args

ROOT = Path(__file__).resolve().parents[1]

require_ray()

# Under pytest-xdist (`--dist loadgroup`), every Ray test runs on one worker: one local cluster at a time.
pytestmark = pytest.mark.xdist_group("ray")


@pytest.mark.slow
def test_comparison_on_ray_equals_local_and_a_killed_driver_resumes(tiny_world_folder, tmp_path):
    """The whole comparison on Ray gives the local run's tables byte for byte (cost included). A Ray run whose
    driver is killed -9 midway resumes from the store, on the local executor, to the same tables."""
    from analyses.compare_methods import main

    assert main(_args(tiny_world_folder, tmp_path / "local")) == 0
    assert main(_args(tiny_world_folder, tmp_path / "ray", "--executor", "ray", "--ray-workers", "2")) == 0
    assert_same_tables(tmp_path / "local", tmp_path / "ray")

    out = tmp_path / "killed"
    code = killed_compare_run(_args(tiny_world_folder, out, "--executor", "ray", "--ray-workers", "2"), out, ROOT)
    assert code != 0, "the run finished before it could be killed: make the configuration bigger"
    assert json.loads((out / "status.json").read_text())["status"] == "running"
    assert main(_args(tiny_world_folder, out)) == 0
    assert_same_tables(tmp_path / "local", out)
