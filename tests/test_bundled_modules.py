"""Bundled modules named `org.osbuild.*` take exactly osbuild 191's options.

Stages and assemblers, and the inputs, devices, mounts and sources the engine implements itself.

Each one's validation schema, for both manifest formats, must equal what osbuild's own library gives the
module of the same name, but for the words (descriptions, titles, examples): the same types, patterns,
enums, required and forbidden keys, so that a manifest is valid for one exactly when it is for the other.
aosbuild's additions live under `org.aosbuild.*` names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aosbuild.library import BUNDLED_ROOT
from aosbuild.moduleinfo import ModuleInfo, ModuleMetaError, read_module

from .conftest import OsbuildOracle

# keywords that document and do not validate (`descriptions` is a misspelling in some of osbuild's schemas)
WORDS = frozenset({"description", "descriptions", "title", "examples", "$comment"})
# kind -> (folder in the bundled root, folder in osbuild's library)
KINDS = {"Stage": ("stages", "stages"), "Assembler": ("assemblers", "assemblers"),
         "Input": ("schemas/inputs", "inputs"), "Device": ("schemas/devices", "devices"),
         "Mount": ("schemas/mounts", "mounts"), "Source": ("sources", "sources")}


def bundled(kind: str) -> list[str]:
    folder = BUNDLED_ROOT / KINDS[kind][0]
    return sorted(p.name[:-len(".meta.json")] for p in folder.glob("org.osbuild.*.meta.json"))


BUNDLED = [(kind, name) for kind in KINDS for name in bundled(kind)]


def rules(node: Any, names: bool = False) -> Any:
    """The schema without its words; `names` marks a map of property names, where any key is a name."""
    if isinstance(node, dict):
        return {k: rules(v, k in ("properties", "patternProperties", "definitions") and not names)
                for k, v in node.items() if names or k not in WORDS}
    if isinstance(node, list):
        return [rules(v) for v in node]
    return node


def schema_of(info: ModuleInfo, version: str) -> Any:
    try:
        return rules(info.validation_schema(version))
    except ModuleMetaError:
        return "no schema"


def test_the_bundled_library_has_org_osbuild_modules_of_every_kind() -> None:
    assert len([n for k, n in BUNDLED if k == "Stage"]) >= 25
    assert len([n for k, n in BUNDLED if k == "Assembler"]) >= 3
    assert {k for k, _ in BUNDLED} == set(KINDS)


@pytest.mark.parametrize(("kind", "name"), BUNDLED, ids=[f"{k.lower()}/{n}" for k, n in BUNDLED])
def test_takes_exactly_osbuilds_options(osbuild_oracle: OsbuildOracle, kind: str, name: str) -> None:
    ours = read_module(kind, name, BUNDLED_ROOT, KINDS[kind][0])
    theirs = read_module(kind, name, osbuild_oracle.libdir, KINDS[kind][1])
    assert ours is not None
    assert theirs is not None, f"osbuild has no {kind.lower()} {name}: name it org.aosbuild.*"
    for version in ("1", "2"):
        assert schema_of(ours, version) == schema_of(theirs, version), f"format {version}"
    assert ours.capabilities == theirs.capabilities


def test_the_comparison_sees_an_added_option(osbuild_oracle: OsbuildOracle, tmp_path: Path) -> None:
    """What the test above compares: an extra option, or a stricter rule, is a difference; a word is not."""
    theirs = read_module("Stage", "org.osbuild.hostname", osbuild_oracle.libdir, "stages")
    assert theirs is not None
    options = dict(theirs.schema_v1)
    reworded = {**options, "properties": {"hostname": {"type": "string", "description": "other words"}}}
    added = {**options, "properties": {**options["properties"], "domain": {"type": "string"}}}
    stricter = {**options, "properties": {"hostname": {"type": "string", "minLength": 1}}}
    for schema, same in ((reworded, True), (added, False), (stricter, False)):
        variant = ModuleInfo(kind="Stage", name=theirs.name, root=tmp_path, path=None, schema_v1=schema)
        assert (schema_of(variant, "2") == schema_of(theirs, "2")) is same
