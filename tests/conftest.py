"""Shared fixtures of the model-level tests (world, components, interventions, methods).

Every fixture name starts with ``tiny_`` so that it cannot collide with fixtures other test files define. The
machine runs other CPU-heavy work: torch is limited to one thread here, before any test builds a model.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Make ``--dist loadgroup`` group the tests by their ``xdist_group`` mark.

    pytest-xdist's worker names each item ``<nodeid>@<group>`` so that its scheduler sends a group to one worker. It
    does so by writing ``item._nodeid``, which pytest 9.2 no longer reads (a node's id is ``item._id``, a
    ``NodeId``): the marks were ignored, and every module "on one worker" (its run folder made once, one Ray cluster
    at a time) ran on both. This hook, after xdist's, gives each marked item the name xdist meant to give it; when
    xdist's own renaming works (the id already ends in ``@<group>``) it does nothing."""
    if not getattr(config.option, "loadgroup", False):  # set on xdist's workers under --dist loadgroup only
        return
    from _pytest.nodeid import NodeId

    for item in items:
        names = {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                 for m in item.iter_markers("xdist_group")}
        suffix = "@" + "_".join(sorted(names))
        if names and not item.nodeid.endswith(suffix):
            item._id = NodeId.parse(item.nodeid + suffix)


@pytest.fixture
def refused(capsys):
    """``refused(main, argv)`` runs a command that must refuse its arguments before any work: exit code 2, no
    traceback, exactly one ``error:`` line on stderr, which it returns."""

    def run(main, argv) -> str:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2, err
        assert "Traceback" not in err, err
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1, err
        return lines[0]

    return run


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test starts on one thread, whatever the test before it set (a command's ``main`` sets torch's thread
    count for the whole process; a Ray test comparing bit for bit with one-thread workers must not inherit two)."""
    torch.set_num_threads(1)
    yield


def _build_tiny_world_model(seed: int = 0):
    import interp
    from interp.world.model import ModelConfig, build_pipeline

    return interp.load_model(build_pipeline(ModelConfig.tiny(), seed=seed))


@pytest.fixture(scope="session")
def tiny_world_model():
    """The tiny concept-world model (random weights, no classifier), shared by the whole session: tests must leave
    its weights untouched (several of them check exactly that)."""
    return _build_tiny_world_model()


def float64_copy(model):
    """The float64 copy of ``model`` that a float64 objective on it runs (made through the public API)."""
    import interp

    config = interp.ObjectiveConfig(n_images=1, timesteps=(300,), gen_steps=1, dtype="float64")
    return interp.Objective(model, interp.text_concept("red", n=1) if model.world is None else "red",
                            config).model


@pytest.fixture(scope="session")
def _tiny_world_model_f64_shared(tiny_world_model):
    return float64_copy(tiny_world_model)


@pytest.fixture
def tiny_world_model_f64(_tiny_world_model_f64_shared):
    """The tiny model's float64 copy, shared by the session: what ``Objective(tiny_world_model, ...,
    ObjectiveConfig(dtype="float64"))`` makes for itself (a deep copy, and its FLOP and replay bookkeeping counted
    again on the meta device: about a second each time), made once. Objectives on it compute the same values;
    its pass counters are shared, so read their changes, not their totals. A test that leaves its weights, hooks or
    gradients changed fails at teardown."""
    from helpers import assert_untouched

    model = _tiny_world_model_f64_shared
    before = model.state_fingerprint()
    yield model
    assert_untouched(model, before)


@pytest.fixture
def tiny_world_model_factory():
    """Build a fresh tiny concept-world model (for tests that edit weights)."""
    return _build_tiny_world_model


@pytest.fixture(scope="session")
def tiny_world_folder(tmp_path_factory):
    """A concept-world folder (pipeline + a random classifier) of the tiny architecture, as the trainer lays it out.
    Shared by the session: tests that damage files copy it first."""
    from interp.world.classifier import ConceptClassifier
    from interp.world.model import ModelConfig, build_pipeline

    d = tmp_path_factory.mktemp("tinyworld")
    build_pipeline(ModelConfig.tiny(), seed=0).save_pretrained(d / "pipeline")
    torch.manual_seed(0)
    clf = ConceptClassifier(width=4)
    clf(torch.zeros(1, 3, 16, 16))
    clf.save(d)
    return d


@pytest.fixture(scope="session")
def tiny_objective_config():
    from interp.core.objectives import ObjectiveConfig

    return ObjectiveConfig(n_images=2, timesteps=(300, 700))


@pytest.fixture(scope="session")
def tiny_red_objective(tiny_world_model, tiny_objective_config):
    """The erase objective of "red" on the tiny model: 2 images x 2 timesteps = 4 samples."""
    from interp.core.objectives import Objective

    return Objective(tiny_world_model, "red", tiny_objective_config)


@pytest.fixture
def no_figures(monkeypatch):
    """Runs in this test make empty figures written as 1x1 PNGs (:func:`helpers.placeholder_figures`): for tests that
    never look at a figure."""
    from helpers import placeholder_figures

    placeholder_figures(monkeypatch)


class _Lazy(dict):
    """A dict that makes a missing entry with ``make(key)`` on first use."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, key):
        self[key] = value = self.make(key)
        return value


@pytest.fixture(scope="session")
def tiny_family_folders(tmp_path_factory):
    """A tiny random pipeline folder per family (``interp.testing.FAMILIES``), each built on first use and shared
    read-only by the session (tests that damage files copy one first)."""
    from interp import testing

    root = tmp_path_factory.mktemp("families")
    return _Lazy(lambda f: testing.tiny_pipeline(root / f, f))


@pytest.fixture(scope="session")
def tiny_family_models(tiny_family_folders):
    """Each family's tiny folder loaded on the CPU on first use, shared by the session: a test leaves it as it found
    it (every method and edit restores the model; tests that change weights build their own)."""
    import interp

    return _Lazy(lambda f: interp.load_model(str(tiny_family_folders[f]), device="cpu"))
