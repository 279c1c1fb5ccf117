"""Fuzzed manifests: every document either loads or is refused with exit 2 and a message, never a traceback."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aosbuild import cli
from aosbuild.errors import ManifestError
from aosbuild.formats import describe, load
from aosbuild.library import Library

from .conftest import GOLDEN

LIBRARY = Library()
SEEDS = [json.loads(p.read_text()) for p in sorted(GOLDEN.glob("*.json"))]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**40) | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.sampled_from(["name:os", "name:tree", "org.osbuild.noop", "org.osbuild.tree", "org.osbuild.pipeline",
                       "org.osbuild.source", "2", "1", "sha256:" + "0" * 64]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["version", "pipelines", "name", "stages", "type", "options", "inputs", "build",
                         "references", "origin", "devices", "mounts", "source", "target", "parent", "sources",
                         "items", "pipeline", "assembler", "runner", "x"]) | st.text(max_size=6),
        children, max_size=5),
    max_leaves=20)


def paths_in(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths_in(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += paths_in(child, (*prefix, index))
    return found


@st.composite
def mutated_manifests(draw: st.DrawFn) -> Any:
    """A golden manifest with one node replaced by random JSON, or deleted."""
    document = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    paths = paths_in(document)
    path = draw(st.sampled_from(paths))
    if not path:
        return draw(json_values)
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values)
    return document


def check_loads_or_refuses(document: Any) -> None:
    refusal: ManifestError | None = None
    try:
        manifest = load(document, LIBRARY, "fuzz.json")
    except ManifestError as exc:
        refusal = exc
    if refusal is None:
        json.dumps(describe(manifest))
        return
    assert refusal.problems, "a refusal must say what is wrong"
    assert refusal.render().startswith("fuzz.json has errors:")
    json.dumps(refusal.as_json())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_manifests())
def test_mutated_manifests_load_or_are_refused(document: Any) -> None:
    check_loads_or_refuses(document)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_random_documents_load_or_are_refused(document: Any) -> None:
    check_loads_or_refuses(document)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutated_manifests())
def test_inspect_exits_0_or_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], document: Any) -> None:
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(document))
    code = cli.main(["--inspect", str(path)])
    out = capsys.readouterr().out
    assert code in (0, 2)
    parsed = json.loads(out)
    assert ("errors" in parsed) == (code == 2)
