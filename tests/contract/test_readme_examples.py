"""Every ```python block of the package READMEs runs as written (blocks tagged ``no-run`` need real data)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[str, str]]:
    found = []
    for readme in sorted((ROOT / "packages").glob("*/README.md")):
        for i, m in enumerate(BLOCK.finditer(readme.read_text())):
            if "no-run" not in m.group(1):
                found.append((f"{readme.parent.name}#{i}", m.group(2)))
    return found


@pytest.mark.parametrize(("name", "code"), _blocks(), ids=[n for n, _ in _blocks()])
def test_readme_example_runs(name: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if "fiber_eval" not in code:
        pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    code = code.replace("/tmp/", f"{tmp_path}/")
    module = types.ModuleType("readme_example")  # a real module, so dataclasses can resolve their namespace
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, name, "exec"), module.__dict__)
