"""Module attributes imported on first use (PEP 562), so importing a package does not import its heavy parts."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_attributes(namespace: dict[str, Any], where: dict[str, str]) -> tuple[Callable, Callable]:
    """``__getattr__`` and ``__dir__`` for the module whose ``globals()`` is ``namespace``: each name of
    ``where`` is imported from the module it maps to on first access, then kept in ``namespace``."""

    def __getattr__(name: str):
        if name in where:
            value = namespace[name] = getattr(importlib.import_module(where[name]), name)
            return value
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
