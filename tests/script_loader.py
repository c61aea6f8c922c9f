"""Import a script of the repository (``scripts/``, ``benchmarks/``) as a module, for tests of its functions.

The scripts are not packages; tests load them from their file. ``tests/`` is on ``sys.path`` because its
``conftest.py`` is (pytest's default import mode), so any test module can ``from script_loader import load_script``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: Path, name: str) -> ModuleType:
    """Execute the file ``path`` as the module ``name`` (registered in ``sys.modules``, so pickling and later
    imports find it) and return it. Its folder goes on ``sys.path`` first, so sibling imports resolve."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
