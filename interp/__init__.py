"""interp: find where a text-to-image diffusion model keeps a concept, with several methods checked against each other.

Quick tour::

    import interp
    model = interp.load_model("concept-world")            # or a Stable Diffusion folder / hub id / pipeline
    comps = model.components("neuron", family="ff", kind="ff.net.0")
    df = interp.attribute("cad", model, "red", comps)     # tidy DataFrame, score > 0 = supports the concept

This module exports the small core listed in ``__all__``: loading a model, naming its components and concepts,
the objective J, running a method by name, generating images, the result store, the cost record, image judges and
the cost plan. Everything else lives in its module, one floor per folder, each floor importing only the ones below:

- :mod:`interp.core`: models, components, interventions, the objective, noise models, generation, judges, the
  engine and executors, the store, results and run folders;
- :mod:`interp.methods`: the method registry, one file per method;
- :mod:`interp.studies`: the comparison, erasure curves, editing, the cost plan, the evaluation of attributions;
- :mod:`interp.report`: plots, tables and the HTML report;
- :mod:`interp.world`: the concept world, a plugin the other floors never import.

The floors and their modules are reachable as attributes too (``interp.report.plots`` after a plain
``import interp``).

Public names are imported lazily so that ``import interp`` stays fast.
"""

from __future__ import annotations

from interp._lazy import lazy_submodules

# The core: each name and the module that defines it (the API reference documents each under "interp").
_EXPORTS = {
    "load_model": "interp.core.models",
    "DiffusionModel": "interp.core.models",
    "ModelLoadError": "interp.core.models",
    "Component": "interp.core.components",
    "ComponentSet": "interp.core.components",
    "UnknownComponentError": "interp.core.components",
    "Concept": "interp.core.concepts",
    "text_concept": "interp.core.concepts",
    "Objective": "interp.core.objectives",
    "ObjectiveConfig": "interp.core.objectives",
    "NonFiniteObjectiveError": "interp.core.objectives",
    "attribute": "interp.methods",
    "maps": "interp.methods",
    "generate": "interp.core.generation",
    "Store": "interp.core.store",
    "Cost": "interp.core.results",
    "Judge": "interp.core.judges",
    "load_judge": "interp.core.judges",
    "plan_comparison": "interp.studies.plan",
}

__all__ = sorted(_EXPORTS)

# Submodules reachable as attributes after a plain ``import interp`` (imported on first use).
_SUBMODULES = {"core", "methods", "studies", "report", "world", "notebook", "testing"}

__getattr__, __dir__ = lazy_submodules("interp", _SUBMODULES, _EXPORTS)
