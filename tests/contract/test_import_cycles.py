"""No module-level import cycle inside any package.

An edge ``a -> b`` is an import of ``b`` that runs when ``a`` is imported: at module level or in a class body,
including ``try`` / ``if`` blocks, but not under ``if TYPE_CHECKING:`` and not inside a function (a lazy import).
``from p import name`` is an edge to the module ``p.name`` when that is a module, else to ``p`` (its
``__init__``). Only modules of the same package count.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module_names(src: Path) -> dict[str, Path]:
    """``dotted.name -> file`` of every module under a package's ``src`` folder."""
    out = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue  # runs when called, not when imported
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _module_level_imports(node.body)
            found += _module_level_imports(node.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    found += _module_level_imports([c for c in children if isinstance(c, ast.stmt)])
                    for handler in children:
                        if isinstance(handler, ast.ExceptHandler):
                            found += _module_level_imports(handler.body)
    return found


def import_graph(src: Path) -> dict[str, set[str]]:
    """Module-level import edges between the modules under ``src`` (see the module docstring)."""
    modules = _module_names(src)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _module_level_imports(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_level_import_cycle_in_any_package() -> None:
    srcs = sorted(ROOT.glob("packages/*/src"))
    assert len(srcs) >= 6
    found = {src.parent.name: cycles(import_graph(src)) for src in srcs}
    assert {pkg: c for pkg, c in found.items() if c} == {}


def test_the_cycle_finder_sees_a_cycle_and_ignores_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pkg.a import A\n")
    (pkg / "a.py").write_text("from . import b\nA = 1\n")
    (pkg / "b.py").write_text("try:\n    from pkg.c import C\nexcept ImportError:\n    pass\n")
    (pkg / "c.py").write_text("import pkg.a\nC = 1\n")
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import e\ndef f():\n    from pkg import e\n"
    )
    (pkg / "e.py").write_text("from pkg import d\n")
    graph = import_graph(tmp_path)
    assert graph["pkg.d"] == set() and graph["pkg.e"] == {"pkg.d"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_the_cycle_finder_covers_subpackages(tmp_path: Path) -> None:
    """Modules of subpackages (``fiber_data.sources.vqa``) are nodes; relative imports resolve inside them."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "x.py").write_text("from ..y import Y\nX = 1\n")
    (pkg / "y.py").write_text("from pkg.sub import x\nY = 1\n")
    graph = import_graph(tmp_path)
    assert graph["pkg.sub.x"] == {"pkg.y"} and graph["pkg.y"] == {"pkg.sub.x"}
    assert cycles(graph) == [["pkg.sub.x", "pkg.y"]]
    real = import_graph(ROOT / "packages/fiber-data/src")
    assert {"fiber_data.sources.vqa", "fiber_data.text.spans", "fiber_data.synthetic.world"} <= set(real)
