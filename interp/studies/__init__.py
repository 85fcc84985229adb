"""The studies floor: a configuration in, a run folder out. The comparison of methods (``compare``, its config and
its tables and figures), erasure curves, concept editing, the cost plan and the evaluation of attributions. Studies
ask the method registry for capabilities, never for method names.

Each module is reachable as an attribute (``interp.studies.erasure``), imported on first use.
"""

from __future__ import annotations

import importlib

_MODULES = {"compare", "compare_config", "compare_outputs", "compare_report", "editing", "erasure", "plan"}


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*_MODULES, "__doc__", "__name__", "__file__", "__path__"})
