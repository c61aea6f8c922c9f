"""Package hygiene: public API importable, optional extras stay lazy, no sibling-package imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import fiber_data
from fiber_data import HFTokenizer, MissingExtraError, load_tokenizer
from fiber_data.formats.arrow import read_arrow_table

SRC = Path(fiber_data.__file__).parent
SIBLINGS = {"fiber_backbones", "fiber_heads", "fiber_train", "fiber_eval"}
OPTIONAL = {"pyarrow", "transformers", "webdataset", "tqdm"}


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
    for path in sorted(SRC.rglob("*.py")):
        top = _top_level_imports(path)
        assert not top & SIBLINGS, f"{path.name} imports a sibling package"
        assert not top & OPTIONAL, f"{path.name} imports an optional extra at module level"
        every = {
            name.split(".")[0]
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for name in ([n.module or ""] if isinstance(n, ast.ImportFrom) else [a.name for a in n.names])
        }
        assert not every & SIBLINGS, f"{path.name} imports a sibling package"


def test_import_does_not_load_extras() -> None:
    code = "import sys, fiber_data; print(sorted(m for m in ('pyarrow', 'transformers', 'webdataset') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_missing_extras_name_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    with pytest.raises(MissingExtraError, match=r"pip install 'fiber-data\[arrow\]'"):
        read_arrow_table(tmp_path / "x.arrow")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match=r"fiber-data\[hf\]"):
        HFTokenizer.from_pretrained(tmp_path)


def test_unknown_hub_name_fails_offline_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cannot load tokenizer 'no-such-org/no-such-tokenizer'"):
        load_tokenizer("no-such-org/no-such-tokenizer")
