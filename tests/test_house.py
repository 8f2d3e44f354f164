"""The shape of the house (issue #22's targets), read from the source with ``ast``: no import
circle inside sweeper/ (an import inside a function counts: it runs too), no module over 450
lines, no class over 250, no function over 90; click only in the CLI package; errors.py on the
standard library alone. `python benchmarks/house.py` adds the fast tier's time."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SWEEPER = Path(__file__).resolve().parents[1] / "sweeper"
MAX_MODULE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 450, 250, 90


def module_name(path: Path) -> str:
    parts = path.relative_to(SWEEPER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SWEEPER.rglob("*.py"))}


def imported_modules(path: Path, known: dict[str, Path]) -> set[str]:
    """The sweeper modules ``path`` imports, wherever the import statement stands. A submodule
    import (``from sweeper.data import base``) counts as an import of the submodule only, not
    of its package's ``__init__``, which Python runs first without a circle between them."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known and name != here)
    return found


def import_cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    known = modules()
    graph = {name: imported_modules(path, known) for name, path in known.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for name in graph:
        if name not in index:
            visit(name)
    return cycles


def oversized() -> list[str]:
    found = []
    for name, path in modules().items():
        source = path.read_text()
        lines = source.count("\n")
        if lines > MAX_MODULE_LINES:
            found.append(f"module {name}: {lines} lines (max {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                limit, kind = MAX_CLASS_LINES, "class"
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                limit, kind = MAX_FUNCTION_LINES, "function"
            else:
                continue
            size = node.end_lineno - node.lineno + 1  # from `def`: a command's option decorators are declarations
            if size > limit:
                found.append(f"{kind} {name}.{node.name} (line {node.lineno}): {size} lines (max {limit})")
    return found


def importers_of(root: str) -> list[str]:
    """The sweeper modules with an import of ``root`` (a top-level package name) anywhere."""
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == root for a in node.names):
                found.append(name)
                break
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == root:
                found.append(name)
                break
    return found


def test_no_import_circle_inside_sweeper():
    assert import_cycles() == []


def test_no_module_class_or_function_past_its_size():
    assert oversized() == []


def test_click_is_imported_by_the_cli_package_only():
    assert [m for m in importers_of("click") if not m.startswith("sweeper.cli")] == []


def test_errors_needs_the_standard_library_alone():
    known = modules()
    assert imported_modules(known["sweeper.errors"], known) == set()
    assert "sweeper.errors" not in importers_of("click")


def test_the_checks_see_what_they_look_for(tmp_path, monkeypatch):
    """The checks themselves on a made-up package: a lazy import that closes a circle, an
    oversized function and a relative import are all found."""
    package = tmp_path / "sweeper"
    (package / "inner").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from sweeper import b\n")
    (package / "b.py").write_text("def later():\n    from sweeper.inner import c\n")
    (package / "inner" / "__init__.py").write_text("")
    (package / "inner" / "c.py").write_text("from .. import a\n\n\ndef long():\n" + "    x = 1\n" * 95)
    monkeypatch.setattr(sys.modules[__name__], "SWEEPER", package)
    assert import_cycles() == [["sweeper.a", "sweeper.b", "sweeper.inner.c"]]
    assert oversized() == ["function sweeper.inner.c.long (line 4): 96 lines (max 90)"]


def test_every_package_of_sweeper_ships():
    """pyproject.toml lists the packages: one left out installs without its modules (the images
    and any non-editable install fail with ModuleNotFoundError, as the compose stack once did)."""
    import tomllib

    config = tomllib.loads((SWEEPER.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {module_name(p.parent / "__init__.py") for p in SWEEPER.rglob("__init__.py")}
    assert packages - set(config["packages"]) == set()
