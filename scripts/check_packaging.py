"""Prove that each package installs and imports alone with only its declared dependencies.

Three checks, all run by ``scripts/test.sh``:

1. Static: every module a package imports is the standard library, the package itself, or a declared
   dependency (core dependencies for imports at module level; core or an extra for imports made lazily
   inside a function or a ``try`` block). Sibling packages may only be imported along
   :data:`ALLOWED_SIBLINGS`: ``fiber-models`` uses the three torch leaves, ``fiber-train`` everything.
2. ``fiber-eval`` in a brand-new venv with nothing but its own dependencies (no torch): it installs,
   imports, and its test-suite passes there.
3. The five torch packages each in their own venv that shares only a torch/torchvision base (a ``.pth``
   file pointing at links to torch, torchvision and their own requirements, so the 6 GB are not copied):
   ``pip install`` of the package with its declared dependencies, then an import of its public API;
   ``fiber-models`` also saves, loads and runs a tiny model there (no lightning-fabric installed).

Usage: python scripts/check_packaging.py [--static-only] [--keep]
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["fiber-backbones", "fiber-heads", "fiber-data", "fiber-eval", "fiber-models", "fiber-train"]
SIBLINGS = {p.replace("-", "_"): p for p in PACKAGES}
# package -> the sibling packages it may depend on (the dependency DAG; everything else is a leaf)
ALLOWED_SIBLINGS = {
    "fiber-models": {"fiber-backbones", "fiber-heads", "fiber-data"},
    "fiber-train": {"fiber-backbones", "fiber-heads", "fiber-data", "fiber-eval", "fiber-models"},
}
# import name -> distribution name, where they differ
IMPORT_TO_DIST = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "lightning": "lightning-fabric",
    "lightning_fabric": "lightning-fabric",
    "pycocotools": "pycocotools",
    "pycocoevalcap": "pycocoevalcap",
    "sklearn": "scikit-learn",
    "cv2": "opencv-python",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    return _norm(re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0])


def declared(pyproject: Path) -> tuple[set[str], set[str]]:
    """(core dependency names, extra dependency names) of a pyproject."""
    project = tomllib.loads(pyproject.read_text())["project"]
    core = {_req_name(r) for r in project.get("dependencies", [])}
    extras = {_req_name(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    return core, extras


class _ImportVisitor(ast.NodeVisitor):
    """Collects (top-level module, lazy?) for every absolute import."""

    def __init__(self) -> None:
        self.found: list[tuple[str, bool, int]] = []
        self._depth = 0

    def _lazy_scope(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Try = _lazy_scope

    def visit_If(self, node: ast.If) -> None:
        # `if TYPE_CHECKING:` blocks are not executed at run time
        test = node.test
        if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name.split(".")[0], self._depth > 0, node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self.found.append((node.module.split(".")[0], self._depth > 0, node.lineno))


def static_check() -> list[str]:
    errors = []
    stdlib = set(sys.stdlib_module_names)
    for pkg in PACKAGES:
        pkg_dir = ROOT / "packages" / pkg
        own = pkg.replace("-", "_")
        core, extras = declared(pkg_dir / "pyproject.toml")
        allowed = {_norm(p) for p in ALLOWED_SIBLINGS.get(pkg, set())}
        for dep in core | extras:
            if dep in {_norm(p) for p in PACKAGES} and dep not in allowed:
                errors.append(f"{pkg}: declares a dependency on sibling package {dep} (allowed: {sorted(allowed)})")
        for path in sorted((pkg_dir / "src").rglob("*.py")):
            visitor = _ImportVisitor()
            visitor.visit(ast.parse(path.read_text(), filename=str(path)))
            for module, lazy, line in visitor.found:
                if module in stdlib or module == own or module == "__future__":
                    continue
                where = f"{path.relative_to(ROOT)}:{line}"
                if module in SIBLINGS:
                    if _norm(SIBLINGS[module]) not in allowed:
                        errors.append(f"{where}: {pkg} imports sibling package {module}")
                    elif _norm(SIBLINGS[module]) not in core:
                        errors.append(f"{where}: imports {module} but {SIBLINGS[module]} is not a dependency")
                    continue
                dist = _norm(IMPORT_TO_DIST.get(module, module))
                if dist in core:
                    continue
                if dist in extras and lazy:
                    continue
                kind = "an extra imported at module level" if dist in extras else "undeclared"
                errors.append(f"{where}: imports '{module}' ({dist}), which is {kind} in {pkg}/pyproject.toml")
    return errors


def _run(cmd: list[str], **kw) -> None:
    print("  $", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def _requirement_closure(names: list[str]) -> set[str]:
    """Installed distributions needed by ``names`` (run-time requirements, markers evaluated, no extras)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(req.name)
    return seen


def _torch_base(base: Path) -> None:
    """Links to torch, torchvision and their requirements from the current environment into ``base``."""
    base.mkdir(parents=True)
    site = Path(str(md.distribution("torch").locate_file("")))
    for name in sorted(_requirement_closure(["torch", "torchvision"])):
        dist = md.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            src = site / top
            if src.exists() and not (base / top).exists():
                (base / top).symlink_to(src)


def venv_checks(keep: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fiber-packaging-"))
    try:
        # fiber-eval: a real, empty venv (no torch at all)
        venv = tmp / "eval"
        print("[packaging] fiber-eval in an empty venv (no torch)", flush=True)
        _run([sys.executable, "-m", "venv", str(venv)])
        py = str(venv / "bin" / "python")
        _run(
            [
                py,
                "-m",
                "pip",
                "install",
                "-q",
                "-c",
                str(ROOT / "constraints.txt"),
                str(ROOT / "packages/fiber-eval"),
                "pytest",
            ]
        )
        _run(
            [
                py,
                "-c",
                "import importlib.util as u, fiber_eval; assert u.find_spec('torch') is None; print('  fiber_eval', fiber_eval.__name__, 'imports without torch')",
            ]
        )
        _run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "eval")], cwd=tmp)

        base = tmp / "torch-base"
        _torch_base(base)
        deps_closure = {
            "fiber-backbones": ["fiber-backbones"],
            "fiber-heads": ["fiber-heads"],
            "fiber-data": ["fiber-data"],
            "fiber-models": ["fiber-backbones", "fiber-heads", "fiber-data", "fiber-models"],
            "fiber-train": PACKAGES,
        }
        for pkg, to_install in deps_closure.items():
            print(f"[packaging] {pkg} in a venv sharing only torch/torchvision", flush=True)
            venv = tmp / pkg
            _run([sys.executable, "-m", "venv", str(venv)])
            site = next((venv / "lib").glob("python*/site-packages"))
            (site / "_fiber_torch_base.pth").write_text(str(base) + "\n")
            py = str(venv / "bin" / "python")
            _run(
                [py, "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt")]
                + [str(ROOT / "packages" / p) for p in to_install]
            )
            mod = pkg.replace("-", "_")
            _run(
                [
                    py,
                    "-c",
                    f"import {mod}, importlib; print('  {mod} imports:', len([n for n in dir({mod}) if not n.startswith('_')]), 'public names')",
                ]
            )
            if pkg == "fiber-models":
                _run([py, str(ROOT / "scripts" / "models_smoke.py")], cwd=tmp)
    finally:
        if keep:
            print(f"[packaging] kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--static-only", action="store_true", help="only the static import/dependency check")
    parser.add_argument("--keep", action="store_true", help="keep the temporary venvs")
    args = parser.parse_args()
    errors = static_check()
    if errors:
        print("[packaging] undeclared or forbidden imports:")
        for e in errors:
            print("  -", e)
        return 1
    print(f"[packaging] static check: every import of the {len(PACKAGES)} packages is declared")
    if not args.static_only:
        venv_checks(args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
