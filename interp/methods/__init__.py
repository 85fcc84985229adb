"""The registry of attribution methods: one module per method, one interface, one result shape.

``interp.methods.REGISTRY`` maps names to classes; :func:`attribute` runs one by name.
"""

from . import ablation, cad, coar, maskgrad, screen, tracing  # noqa: F401  (registration)
from .base import REGISTRY, Capabilities, Method, MethodConfig, attribute, get

__all__ = ["REGISTRY", "Capabilities", "Method", "MethodConfig", "attribute", "get"]
