"""Inference is not training: fiber_models, ``fiber-train predict`` and the task backends never import the
training tasks, the loop or the demo (predict must not import the demo)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("fiber_train.tasks", "fiber_train.loop", "fiber_train.demo", "fiber_train.checkpoint", "lightning")
INFERENCE_FILES = [
    *sorted((ROOT / "packages/fiber-models/src/fiber_models").rglob("*.py")),
    ROOT / "packages/fiber-train/src/fiber_train/predict_cli.py",
    ROOT / "packages/fiber-train/src/fiber_train/predictor.py",
]


def _imports(path: Path) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
    return found


def test_inference_modules_import_no_training_code_even_lazily() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in INFERENCE_FILES
        for module, line in _imports(path)
        if module.startswith(FORBIDDEN)
    ]
    assert offenders == []


def test_the_checker_sees_a_lazy_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from fiber_train.demo.backends import load_backends\n    return load_backends\n")
    assert [m for m, _ in _imports(bad) if m.startswith(FORBIDDEN)] == ["fiber_train.demo.backends"]


def test_predict_and_backends_import_no_training_module_at_run_time() -> None:
    code = (
        "import sys, fiber_train.predict_cli, fiber_models.backends, fiber_models.pipelines\n"
        f"bad = sorted(m for m in sys.modules if m.startswith({FORBIDDEN!r}))\n"
        "print(bad); raise SystemExit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
