"""The package dependency graph is a DAG (leaves -> fiber-models -> fiber-train), and every import is declared."""

from __future__ import annotations

import ast
import importlib.util
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _checker():
    spec = importlib.util.spec_from_file_location("check_packaging", ROOT / "scripts" / "check_packaging.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_import_is_a_declared_dependency_and_siblings_only_in_fiber_train() -> None:
    errors = _checker().static_check()
    assert errors == []


def test_sibling_dependencies_follow_the_dag() -> None:
    """Leaves depend on no sibling; fiber-models on the three torch leaves; fiber-train on all five."""
    checker = _checker()
    siblings = {"fiber-backbones", "fiber-heads", "fiber-data", "fiber-eval", "fiber-models", "fiber-train"}
    assert set(checker.PACKAGES) == siblings
    for pkg in siblings:
        core, extras = checker.declared(ROOT / "packages" / pkg / "pyproject.toml")
        deps = (core | extras) & siblings
        if pkg == "fiber-train":
            assert deps == siblings - {"fiber-train"}
        elif pkg == "fiber-models":
            assert deps == {"fiber-backbones", "fiber-heads", "fiber-data"}
        else:
            assert deps == set(), f"{pkg} depends on {deps}"


def test_fiber_models_never_imports_the_trainer_or_lightning() -> None:
    """fiber-models is the inference layer: no fiber_train, fiber_eval or lightning import anywhere in it."""
    checker = _checker()
    offenders = []
    for path in sorted((ROOT / "packages/fiber-models/src").rglob("*.py")):
        visitor = checker._ImportVisitor()
        visitor.visit(ast.parse(path.read_text()))
        for module, _lazy, line in visitor.found:
            if module in {"fiber_train", "fiber_eval", "lightning", "lightning_fabric"}:
                offenders.append(f"{path.name}:{line} {module}")
    assert offenders == []


def test_static_checker_catches_an_undeclared_import(tmp_path: Path, monkeypatch) -> None:
    """The checker is not vacuous: a fake package importing an undeclared module and a sibling is flagged."""
    checker = _checker()
    fake = tmp_path / "packages" / "fiber-heads"
    (fake / "src" / "fiber_heads").mkdir(parents=True)
    (fake / "pyproject.toml").write_text('[project]\nname = "fiber-heads"\ndependencies = ["torch"]\n')
    (fake / "src" / "fiber_heads" / "bad.py").write_text("import torch\nimport scipy\nimport fiber_backbones\n")
    monkeypatch.setattr(checker, "ROOT", tmp_path)
    monkeypatch.setattr(checker, "PACKAGES", ["fiber-heads"])
    errors = checker.static_check()
    assert any("'scipy'" in e for e in errors)
    assert any("sibling package fiber_backbones" in e for e in errors)
    assert not any("'torch'" in e for e in errors)


def test_fiber_eval_declares_no_torch() -> None:
    project = tomllib.loads((ROOT / "packages/fiber-eval/pyproject.toml").read_text())["project"]
    assert not any(r.startswith("torch") for r in project["dependencies"])
