"""Each package's version is written once, in its pyproject.toml; ``__version__`` reads the installed metadata."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())


@pytest.mark.parametrize("dist", PACKAGES)
def test_version_is_read_from_metadata(dist: str) -> None:
    project = tomllib.loads((ROOT / "packages" / dist / "pyproject.toml").read_text())["project"]
    module = importlib.import_module(dist.replace("-", "_"))
    assert module.__version__ == md.version(dist) == project["version"]


def test_no_version_literal_in_sources() -> None:
    pattern = re.compile(r"^__version__\s*=\s*[\"']", re.MULTILINE)
    offenders = [
        str(f.relative_to(ROOT))
        for f in (ROOT / "packages").glob("*/src/*/__init__.py")
        if pattern.search(f.read_text())
    ]
    assert not offenders, f"version literals outside pyproject.toml: {offenders}"
