"""The core floor: models of any supported family, their components, interventions through nnsight, the one
objective J, the noise models, generation, judges (the interface), the engine and its executors, the store, results
and run folders. It imports nothing from the floors above (methods, studies, report) and never the concept world.

Each module is reachable as an attribute (``interp.core.models``), imported on first use.
"""

from __future__ import annotations

from interp._lazy import lazy_submodules

_MODULES = {"components", "concepts", "diffusion", "engine", "executors", "families", "features", "generation",
            "interventions", "judges", "models", "objectives", "prefix", "results", "runs", "runtime", "store"}

__getattr__, __dir__ = lazy_submodules(__name__, _MODULES)
