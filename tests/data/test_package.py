"""Package hygiene: public API importable, optional extras stay lazy, no sibling-package imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fiber_data

SRC = Path(fiber_data.__file__).parent
SIBLINGS = {"fiber_backbones", "fiber_heads", "fiber_train", "fiber_eval"}
OPTIONAL = {"pyarrow", "transformers", "tokenizers", "webdataset", "tqdm"}


def test_public_api_resolves() -> None:
    missing = [name for name in fiber_data.__all__ if not hasattr(fiber_data, name)]
    assert not missing
    assert len(set(fiber_data.__all__)) == len(fiber_data.__all__)


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported at module level (function-level imports are the lazy ones)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_sibling_or_eager_optional_imports() -> None:
    for path in sorted(SRC.glob("*.py")):
        top = _top_level_imports(path)
        assert not top & SIBLINGS, f"{path.name} imports a sibling package"
        assert not top & OPTIONAL, f"{path.name} imports an optional extra at module level"
        every = {
            (n.module or "").split(".")[0] if isinstance(n, ast.ImportFrom) else a.name.split(".")[0]
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in (n.names if isinstance(n, ast.Import) else [None])  # type: ignore[list-item]
        }
        assert not every & SIBLINGS, f"{path.name} imports a sibling package"


def test_import_does_not_load_extras() -> None:
    code = "import sys, fiber_data; print(sorted(m for m in ('pyarrow', 'transformers', 'tokenizers', 'webdataset') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
