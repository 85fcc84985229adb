"""The registry of attribution methods: one module per method, one interface, one result shape.

``interp.methods.REGISTRY`` maps names to classes; :func:`attribute` runs one by name (:func:`maps`: the maps of
one with the ``maps`` capability). A new method is one file: a subclass of :class:`Method` with a frozen
:class:`MethodConfig` (its command-line options declared with :func:`option`), its :class:`Capabilities` and its
cost (``planned_rows``), decorated with :func:`register`. Its file is a module of this package, a plugin the
commands load with ``--plugin FILE.py`` (:func:`load_plugin`), or a module an installed package names under the
entry point group ``interp.methods``. Tables, figures, the report, ``--plan`` and the erasure curves read the
registry, so they show it with no other edit (docs/contributing.md walks through one).
"""

from interp.methods import ablation, cad, coar, maskgrad, screen, tracing  # noqa: F401  (registration)
from interp.methods.ablation import Ablation
from interp.methods.base import (
    REGISTRY,
    Attribution,
    Capabilities,
    Estimate,
    Map,
    Method,
    MethodConfig,
    RunContext,
    Scores,
    attribute,
    baseline,
    default_methods,
    get,
    label,
    load_entry_points,
    load_plugin,
    maps,
    option,
    reference,
    register,
)
from interp.methods.cad import CAD
from interp.methods.coar import COAR
from interp.methods.maskgrad import IntegratedGradients, MaskGrad, Midpoint
from interp.methods.screen import ScreenThenVerify
from interp.methods.tracing import CausalTracing

load_entry_points()

__all__ = ["REGISTRY", "Attribution", "Capabilities", "Estimate", "Map", "Method", "MethodConfig", "RunContext", "Scores",
           "attribute", "baseline", "default_methods", "get",
           "label", "load_plugin", "maps", "option", "reference", "register", "Ablation", "CAD", "COAR",
           "CausalTracing", "IntegratedGradients", "MaskGrad", "Midpoint", "ScreenThenVerify"]
