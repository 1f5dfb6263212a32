"""The rotations (``transform.method``), one module each; ``base`` is what they share.

Every module beside ``base`` is imported here, and registers its method as it loads: adding a
method is adding a file.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import HANDLERS, Method, check, describe, handler, rotations

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["HANDLERS", "Method", "check", "describe", "handler", "rotations"]
