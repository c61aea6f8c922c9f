"""A PEP 562 module ``__getattr__`` for lazy package attributes: importing :mod:`fiber_data` (and running
``fiber-data --help``) does not load torch, numpy or Pillow until a loader is used."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(owner: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``owner``: attribute ``name`` is the attribute of the same name of the module
    ``table[name]``, imported on first access (and cached in ``owner``'s namespace)."""

    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            setattr(importlib.import_module(owner), name, value)
            return value
        raise AttributeError(f"module {owner!r} has no attribute {name!r}")

    return __getattr__
