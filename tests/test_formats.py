"""The manifest formats (`aosbuild/formats/`): each in one module, and the only place a manifest's version is read."""

from __future__ import annotations

import ast
import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from aosbuild import engine, formats
from aosbuild.formats import v1, v2
from aosbuild.library import Library

from .conftest import Aosbuild

REPO = Path(__file__).resolve().parent.parent


def inline(text: str) -> tuple[str, dict[str, str]]:
    data = text.encode()
    return "sha256:" + hashlib.sha256(data).hexdigest(), {"encoding": "base64", "data": base64.b64encode(data).decode()}


def version_reads(path: Path) -> list[str]:
    """Where a module reads a manifest's format: `<...manifest...>.version`, or `<...>.get("version")` on a
    description or document."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr == "version" and "manifest" in ast.unparse(node.value):
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "version"
                and any(word in ast.unparse(node.func.value) for word in ("description", "document", "manifest"))):
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_only_the_formats_read_a_manifests_version() -> None:
    package = REPO / "aosbuild"
    inside = [read for p in sorted((package / "formats").rglob("*.py")) for read in version_reads(p)]
    outside = [read for p in sorted(package.rglob("*.py")) if "formats" not in p.relative_to(package).parts
               for read in version_reads(p)]
    assert inside, "the finder must see the dispatch in formats/__init__.py"
    assert outside == []


def test_each_document_is_loaded_described_and_output_by_its_own_format() -> None:
    library = Library()
    one = formats.load({"pipeline": {"stages": [{"name": "org.osbuild.noop"}]}}, library, validate=False)
    two = formats.load({"version": "2", "pipelines": [{"name": "os", "stages": [{"type": "org.osbuild.noop"}]}]},
                       library, validate=False)
    assert formats.of(one) is v1
    assert formats.of(two) is v2
    assert formats.describe(one) == v1.describe(one) == {"pipeline": {"stages": [
        {"name": "org.osbuild.noop", "id": one.pipelines[0].stages[0].id}]}}
    assert formats.describe(two)["version"] == "2"


def test_what_an_export_needs_of_the_sources_depends_on_the_format() -> None:
    a, a_item = inline("a\n")
    b, b_item = inline("b\n")
    sources = {"org.osbuild.inline": {"items": {a: a_item, b: b_item}}}

    def files(checksum: str) -> dict[str, Any]:
        return {"type": "org.osbuild.copy", "inputs": {"f": {
            "type": "org.osbuild.files", "origin": "org.osbuild.source", "references": {checksum: {}}}}}

    two = formats.load({"version": "2", "sources": sources, "pipelines": [
        {"name": "first", "stages": [files(a)]}, {"name": "second", "stages": [files(b)]}]},
        Library(), validate=False)
    # v2 stages reach items only through inputs: an export fetches only what its pipelines use
    assert engine.needed_items(two, [two.pipelines[0]]) == frozenset({a})
    assert engine.needed_items(two, [two.pipelines[1]]) == frozenset({b})
    # v1 stages name files in their options: every item, whatever is exported
    one = formats.load({"pipeline": {"stages": [{"name": "org.osbuild.noop"}]}, "sources": sources},
                       Library(), validate=False)
    assert engine.needed_items(one, [one.pipelines[0]]) is None


def test_sources_only_prints_the_v2_result_for_a_v1_manifest(aosbuild: Aosbuild) -> None:
    """v1's result has no place for what was fetched, so `--sources-only --json` answers in v2's shape."""
    checksum, item = inline("hello\n")
    m = {"pipeline": {"stages": [{"name": "org.osbuild.noop"}]}, "sources": {"org.osbuild.inline": {"items": {
        checksum: item}}}}
    run = aosbuild(m, "--sources-only", "--json", timeout=60)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {
        "type": "result", "success": True, "metadata": {}, "log": {},
        "sources": {"success": True, "org.osbuild.inline": [{"cached": False, "checksum": checksum}]}}
    built = aosbuild(m, "--json", timeout=120)
    assert built.returncode == 0, built.stderr
    result = json.loads(built.stdout)  # a build of it answers in v1's shape
    assert "type" not in result
    assert result["success"] is True
    assert [s["type"] for s in result["stages"]] == ["org.osbuild.noop"]
