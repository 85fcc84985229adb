"""Inputs a new user tries that must get one clear line, fast: an unreachable Ray cluster, absurd thread counts,
seeds beyond what a generator takes."""

from __future__ import annotations

import socket
import time

import pytest

from analyses import compare_methods, edit_concepts, erasure_curves
from interp.core.objectives import MAX_SEED, ObjectiveConfig
from interp.studies.compare_config import CompareConfig


def _closed_port() -> int:
    with socket.socket() as s:  # a port nothing listens on: bound, then released
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_ray_cluster_is_one_line_within_the_timeout(capsys):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as err:
        compare_methods.main(["--executor", "ray", "--ray-address", f"127.0.0.1:{_closed_port()}",
                              "--ray-connect-timeout", "3", "--out", "unused"])
    assert err.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: no Ray cluster answers at 127.0.0.1:") and "waited at most 3 s" in line
    assert "\n" not in line
    assert time.perf_counter() - t0 < 60  # Ray's own retries take minutes; the check is one refused connect


@pytest.mark.parametrize("main", [compare_methods.main, erasure_curves.main, edit_concepts.main])
@pytest.mark.parametrize("threads", ["0", "100000"])
def test_thread_counts_are_bounded(capsys, main, threads):
    with pytest.raises(SystemExit) as err:
        main(["--threads", threads, "--out", "unused"])
    assert err.value.code == 2
    assert f"--threads must be between 1 and 1024, got {threads}" in capsys.readouterr().err


def test_seeds_beyond_a_generators_range_are_refused_before_anything_loads(capsys):
    big = str(2**70)
    for main, flag in ((compare_methods.main, "seed must be between 0 and"),
                       (erasure_curves.main, "--seed must be between 0 and")):
        with pytest.raises(SystemExit):
            main(["--seed", big, "--out", "unused"])
        assert flag in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"seed must be at most 4611686018427387904 \(2\*\*62\)"):
        ObjectiveConfig(seed=MAX_SEED + 1)
    with pytest.raises(ValueError, match="seed must be between 0 and"):
        CompareConfig(seed=-1)
    assert ObjectiveConfig(seed=MAX_SEED).seed == MAX_SEED
