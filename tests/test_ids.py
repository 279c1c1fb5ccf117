"""Ids must be osbuild's: checked against the golden values osbuild printed for the same manifests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aosbuild import ids
from aosbuild.formats import describe, load
from aosbuild.library import Library

from .conftest import GOLDEN, TESTS

# more goldens of our own, printed by osbuild's code for the same manifests (see tests/golden/README.md)
OWN_GOLDEN = TESTS / "golden"
GOLDEN_DIRS = (GOLDEN, OWN_GOLDEN)


def golden_manifests(pattern: str) -> list[Path]:
    return sorted(p for d in GOLDEN_DIRS for p in d.glob(pattern))


V2_GOLDEN = golden_manifests("v2-*.json")


def stage_ids(described: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["name"], s["id"]) for p in described["pipelines"] for s in p.get("stages", [])]


@pytest.mark.parametrize("path", V2_GOLDEN, ids=lambda p: p.stem)
def test_stage_ids_match_osbuild(path: Path) -> None:
    manifest = load(json.loads(path.read_text()), Library(), validate=False)
    expected = json.loads(path.with_suffix(".expected").read_text())
    got = [(p.name, s.id) for p in manifest.pipelines for s in p.stages]
    assert got == stage_ids(expected)


@pytest.mark.parametrize("path", golden_manifests("v*.json"), ids=lambda p: p.stem)
def test_described_manifest_matches_osbuild(path: Path) -> None:
    """v1 and v2: the whole `--inspect` document, ids included (module schemas not needed for ids)."""
    manifest = load(json.loads(path.read_text()), Library(), validate=False)
    assert describe(manifest) == json.loads(path.with_suffix(".expected").read_text())


def test_v1_pipeline_names_and_build_chain() -> None:
    manifest = load(json.loads((GOLDEN / "v1-build-assembler.json").read_text()), Library(), validate=False)
    build, tree, assembler = manifest.pipelines
    assert [p.name for p in manifest.pipelines] == ["build", "tree", "assembler"]
    assert tree.build == build.id
    assert assembler.build == build.id
    assert build.runner == "org.osbuild.linux"
    assert list(assembler.stages[0].inputs["tree"].refs) == [tree.id]


def test_truncate_chmod_reference_values() -> None:
    """The two ids osbuild-behaviour.md §1.3 gives in its text."""
    manifest = load(json.loads((GOLDEN / "v2-truncate-chmod.json").read_text()), Library())
    (tree,) = manifest.pipelines
    assert tree.stages[0].id == "cdf6bd2e0d305beac977095697a8ac0cec4d6f744847363081dfb6ad62c389f3"
    assert tree.id == "fa0e466784d49682a1b7b3cb129b7a75b16bff9c2aed6aee3f0f1988056ce85a"


def test_ids_chain_across_pipelines() -> None:
    manifest = load(json.loads((GOLDEN / "v2-two-pipelines-tree-input.json").read_text()), Library())
    os_tree, archive = manifest.pipelines
    (tree_input,) = archive.stages[0].inputs.values()
    assert list(tree_input.refs) == [os_tree.id]


def test_device_only_hashed_through_mounts() -> None:
    """osbuild quirk: a device that no mount uses does not change the stage id."""
    def with_device(filename: str) -> str:
        m = {"version": "2", "pipelines": [{"name": "p", "stages": [{
            "type": "org.osbuild.noop",
            "devices": {"d": {"type": "org.osbuild.loopback", "options": {"filename": filename}}}}]}]}
        stage_id = load(m, Library(), validate=False).pipelines[0].stages[0].id
        assert stage_id is not None
        return stage_id

    assert with_device("a.img") == with_device("b.img")


def test_source_epoch_changes_ids() -> None:
    def pipeline_id(extra: dict[str, Any]) -> str | None:
        m = {"version": "2", "pipelines": [{"name": "p", **extra,
                                            "stages": [{"type": "org.osbuild.noop"}]}]}
        return load(m, Library()).pipelines[0].id

    assert pipeline_id({}) != pipeline_id({"source-epoch": 1})


def test_context_id_of_main_cli() -> None:
    """The context of osbuild.main_cli with nothing else set has a fixed id (jsonseq-clients.md)."""
    context = {"origin": "osbuild.main_cli",
               "pipeline": {"name": None, "id": None, "stage": {"name": None, "id": None}}}
    assert ids.context_id(context) == "ede22f789202b9017bd24089276f57f559018c593914632c80206be12f5b3bb0"


def test_reference_forms_give_one_id() -> None:
    def input_id(refs: Any) -> str:
        m = {"version": "2",
             "sources": {"org.osbuild.inline": {"items": {
                 "sha256:f80caab74e43203d39d78d3548f5834bb310959a1020f2c9c4c4610e04a24e64":
                     {"encoding": "base64", "data": "aGVsbG8gb3NidWlsZAo="}}}},
             "pipelines": [{"name": "p", "stages": [{"type": "org.osbuild.copy", "options": {"paths": []},
                 "inputs": {"f": {"type": "org.osbuild.files", "origin": "org.osbuild.source",
                                  "references": refs}}}]}]}
        return load(m, Library(), validate=False).pipelines[0].stages[0].inputs["f"].id

    checksum = "sha256:f80caab74e43203d39d78d3548f5834bb310959a1020f2c9c4c4610e04a24e64"
    forms = [[checksum], {checksum: {}}, [{"id": checksum}]]
    assert len({input_id(f) for f in forms}) == 1
