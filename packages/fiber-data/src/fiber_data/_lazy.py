"""Lazy names and old module paths.

- :func:`lazy_getattr` / :func:`lazy_exports`: a PEP 562 module ``__getattr__`` for lazy package attributes: importing
  :mod:`fiber_data` (and running ``fiber-data --help``) does not load torch, numpy or Pillow until a loader is
  used.
- :class:`ModuleAliases`: a meta-path finder that keeps the module paths of the flat layout importable
  (``fiber_data.vqa``, ``fiber_data.tokenization``, ...). An old path that maps to one module *is* that module
  (same object in ``sys.modules``); one whose names were split over several modules is a read-only view that
  looks each attribute up in them, in order. Nothing is imported until an old path is.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable, Mapping, Sequence
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


def lazy_exports(owner: str, table: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a package whose names in ``table`` are imported on first access
    (:func:`lazy_getattr`), and listed by ``dir()`` before that."""

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[owner])) | set(table))

    return lazy_getattr(owner, table), __dir__


class ModuleAliases(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports each old dotted path of ``table`` as the module(s) that now hold its names.

    Args:
        table: old module name → the new module names, in lookup order (one name: the old path is that module).
    """

    def __init__(self, table: Mapping[str, Sequence[str]]) -> None:
        self.table = {old: tuple(new) for old, new in table.items()}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.table:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        targets = [importlib.import_module(name) for name in self.table[spec.name]]
        if len(targets) == 1:
            return targets[0]
        view = types.ModuleType(
            spec.name, f"Old path of {', '.join(m.__name__ for m in targets)} (names looked up in order)."
        )
        vars(view)["__all__"] = [n for m in targets for n in getattr(m, "__all__", ())]

        def __getattr__(name: str) -> Any:
            for module in targets:
                if hasattr(module, name):
                    return getattr(module, name)
            raise AttributeError(f"module {spec.name!r} has no attribute {name!r}")

        vars(view)["__getattr__"] = __getattr__  # PEP 562: looked up in the module's namespace
        return view

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: :meth:`create_module` returned the module (or the view) ready."""

    def install(self) -> ModuleAliases:
        """Append this finder to ``sys.meta_path`` once (after the path finders: a real module always wins)."""
        if not any(isinstance(f, ModuleAliases) and f.table == self.table for f in sys.meta_path):
            sys.meta_path.append(self)
        return self
