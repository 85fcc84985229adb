"""Submodules of a package reachable as attributes, imported on first use (``interp.report.plots`` after a plain
``import interp``), so importing a package stays cheap."""

from __future__ import annotations

import importlib


def lazy_submodules(package: str, names: set[str], exports: dict[str, str] | None = None):
    """``(__getattr__, __dir__)`` for ``package``'s ``__init__``: its submodules ``names``, and names defined in
    other modules (``exports``: name -> module), each imported when first asked for."""
    exports = exports or {}

    def __getattr__(name):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        if name in names:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted({*exports, *names, "__doc__", "__name__", "__file__", "__path__"})

    return __getattr__, __dir__
