"""Package attributes imported on first access (PEP 562 module ``__getattr__``), so that importing a package (and
running ``fiber-train --help``) does not load torch and the training stack."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def resolve(ref: str) -> Any:
    """The object named by ``"package.module:name"``."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def lazy_getattr(owner: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for the module ``owner``: attribute ``name`` is ``table[name]`` (a module path)'s
    attribute of the same name, imported on first access."""

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {owner!r} has no attribute {name!r}")

    return __getattr__
