"""interp: find where a text-to-image diffusion model keeps a concept, with several methods checked against each other.

Quick tour::

    import interp
    model = interp.load_model("concept-world")            # or a Stable Diffusion folder / hub id / pipeline
    comps = model.components("neuron", family="ff", kind="ff.net.0")
    df = interp.attribute("cad", model, "red", comps)     # tidy DataFrame, score > 0 = supports the concept

This module exports the small core listed in ``__all__``: loading a model, naming its components and concepts,
the objective J, running a method by name, generating images, the result store, the cost record, image judges and
the cost plan. Everything else lives in its module and is imported from there: the method registry and the classes
a new method needs (:mod:`interp.methods`), the concept world's own names (:mod:`interp.world`), the notebook helper
(:mod:`interp.notebook`), the CPU allocator tuning (:mod:`interp.runtime`), editing (:mod:`interp.editing`),
erasure curves (:mod:`interp.erasure`), the main job (:mod:`interp.compare`) and the plots (:mod:`interp.plots`).
Those modules are reachable as attributes too (``interp.plots`` after a plain ``import interp``).

Public names are imported lazily so that ``import interp`` stays fast.
"""

from __future__ import annotations

import importlib

# The core: each name and the module that defines it (the API reference documents each under "interp").
_EXPORTS = {
    "load_model": "interp.models",
    "DiffusionModel": "interp.models",
    "ModelLoadError": "interp.models",
    "Component": "interp.components",
    "ComponentSet": "interp.components",
    "UnknownComponentError": "interp.components",
    "Concept": "interp.concepts",
    "text_concept": "interp.concepts",
    "Objective": "interp.objectives",
    "ObjectiveConfig": "interp.objectives",
    "NonFiniteObjectiveError": "interp.objectives",
    "attribute": "interp.methods",
    "maps": "interp.methods",
    "generate": "interp.generation",
    "Store": "interp.store",
    "Cost": "interp.results",
    "Judge": "interp.judges",
    "load_judge": "interp.judges",
    "plan_comparison": "interp.plan",
}

__all__ = sorted(_EXPORTS)

# Submodules reachable as attributes after a plain ``import interp`` (imported on first use).
_SUBMODULES = {"plots", "evaluation", "editing", "erasure", "executors", "methods", "components", "interventions",
               "objectives", "results", "store", "compare", "concepts", "models", "generation", "diffusion", "report",
               "world", "notebook", "judges", "engine", "runs", "compare_config", "plan", "prefix", "testing",
               "runtime"}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:  # interp.plots etc. work after a plain ``import interp``
        return importlib.import_module(f"interp.{name}")
    raise AttributeError(f"module 'interp' has no attribute {name!r}")


def __dir__():
    """The core names and the submodules, what ``dir(interp)`` and tab completion show."""
    return sorted({*__all__, *_SUBMODULES, "__doc__", "__name__", "__file__", "__path__"})
