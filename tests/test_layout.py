"""Rules of the package's layout that a reader relies on, checked over the source."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

PACKAGE = REPO / "aosbuild"
# The command line `aosbuild` (cli) and the console scripts' entry, which imports it by name; the drop-in
# `osbuild` (osbuild_compat) parses its own flags into an Invocation for `run`, as cli does.
ENTRY_POINTS = {"aosbuild/cli.py", "aosbuild/entry.py", "aosbuild/__main__.py"}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the aosbuild modules `path` imports, at the top or inside functions."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_imported_modules_resolves_relative_imports() -> None:
    assert imported_modules(PACKAGE / "osbuild_compat.py") >= {"aosbuild.run", "aosbuild.sizes"}
    assert "aosbuild.sizes" in imported_modules(PACKAGE / "store" / "commands.py")


def test_only_the_entry_points_import_cli() -> None:
    """The engine, the store and the rest never reach back into the command line: cli depends on them."""
    offenders = sorted(path.relative_to(REPO).as_posix() for path in PACKAGE.rglob("*.py")
                       if path.relative_to(REPO).as_posix() not in ENTRY_POINTS
                       and "aosbuild.cli" in imported_modules(path))
    assert offenders == []
