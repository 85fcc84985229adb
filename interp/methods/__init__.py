"""The registry of attribution methods: one module per method, one interface, one result shape.

``interp.methods.REGISTRY`` maps names to classes; :func:`attribute` runs one by name (:func:`maps`: the maps of
one with the ``maps`` capability). A new method is a subclass of
:class:`Method` with a frozen :class:`MethodConfig` and its :class:`Capabilities`, decorated with :func:`register`.
"""

from . import ablation, cad, coar, maskgrad, screen, tracing  # noqa: F401  (registration)
from .ablation import Ablation
from .base import REGISTRY, Capabilities, Method, MethodConfig, attribute, get, maps, register
from .cad import CAD
from .coar import COAR
from .maskgrad import IntegratedGradients, MaskGrad, Midpoint
from .screen import ScreenThenVerify
from .tracing import CausalTracing

__all__ = ["REGISTRY", "Capabilities", "Method", "MethodConfig", "attribute", "get", "maps", "register", "Ablation",
           "CAD", "COAR", "CausalTracing", "IntegratedGradients", "MaskGrad", "Midpoint", "ScreenThenVerify"]
