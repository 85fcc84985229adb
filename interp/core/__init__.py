"""The core floor: models of any supported family, their components, interventions through nnsight, the one
objective J, the noise models, generation, judges (the interface), the engine and its executors, the store, results
and run folders. It imports nothing from the floors above (methods, studies, report) and never the concept world.

Each module is reachable as an attribute (``interp.core.models``), imported on first use.
"""

from __future__ import annotations

import importlib

_MODULES = {"components", "concepts", "diffusion", "engine", "executors", "families", "features", "generation",
            "interventions", "judges", "models", "objectives", "prefix", "results", "runs", "runtime", "store"}


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*_MODULES, "__doc__", "__name__", "__file__", "__path__"})
