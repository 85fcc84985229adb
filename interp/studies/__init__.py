"""The studies floor: a configuration in, a run folder out. The comparison of methods (``compare``, its config and
its tables and figures), erasure curves, concept editing, the cost plan and the evaluation of attributions. Studies
ask the method registry for capabilities, never for method names.

Each module is reachable as an attribute (``interp.studies.erasure``), imported on first use.
"""

from __future__ import annotations

from interp._lazy import lazy_submodules

_MODULES = {"compare", "compare_config", "compare_outputs", "compare_report", "editing", "erasure", "plan"}

__getattr__, __dir__ = lazy_submodules(__name__, _MODULES)
