"""interp: find where a text-to-image diffusion model keeps a concept, with several methods checked against each other.

Quick tour::

    import interp
    model = interp.load_model("concept-world")            # or a Stable Diffusion folder / hub id / pipeline
    comps = model.components("neuron", family="ff", kind="ff.net.0")
    df = interp.attribute("cad", model, "red", comps)     # tidy DataFrame, score > 0 = supports the concept

Public names are imported lazily so that ``import interp`` stays fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_model": "interp.models",
    "DiffusionModel": "interp.models",
    "ModelLoadError": "interp.models",
    "Component": "interp.components",
    "ComponentSet": "interp.components",
    "UnknownComponentError": "interp.components",
    "Concept": "interp.concepts",
    "world_concept": "interp.world.concepts",
    "text_concept": "interp.concepts",
    "Objective": "interp.objectives",
    "ObjectiveConfig": "interp.objectives",
    "NonFiniteObjectiveError": "interp.objectives",
    "attribute": "interp.methods",
    "REGISTRY": "interp.methods",
    "register": "interp.methods",
    "Method": "interp.methods",
    "MethodConfig": "interp.methods",
    "Capabilities": "interp.methods",
    "generate": "interp.generation",
    "Store": "interp.store",
    "maps": "interp.methods",
    "Cost": "interp.results",
    "OutOfVocabularyError": "interp.world.vocab",
    "notebook_setup": "interp.notebook",
    "Judge": "interp.judges",
    "load_judge": "interp.judges",
    "resolve_device": "interp.models",
    "plan_comparison": "interp.plan",
    "tune_cpu_allocator": "interp.runtime",
}

__all__ = sorted(_EXPORTS)


_SUBMODULES = {"plots", "evaluation", "editing", "methods", "components", "interventions", "objectives", "results",
               "store", "compare", "concepts", "models", "generation", "diffusion", "report", "world", "notebook",
               "judges", "engine", "runs", "compare_config", "plan", "testing", "runtime"}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:  # interp.plots etc. work after a plain ``import interp``
        return importlib.import_module(f"interp.{name}")
    raise AttributeError(f"module 'interp' has no attribute {name!r}")
