"""Loading and validation: every problem at once, each at its JSON path, exit 2."""

from __future__ import annotations

import json
from typing import Any

import pytest

from aosbuild.errors import ManifestError
from aosbuild.formats import load
from aosbuild.library import Library
from aosbuild.loading import parse

from .conftest import Aosbuild, OsbuildOracle, manifest, pipeline, stage

COPY_OPTIONS = {"paths": [{"from": "input://t/x", "to": "tree:///x"}]}


def problems(description: Any) -> list[tuple[str, str]]:
    with pytest.raises(ManifestError) as info:
        load(description, Library())
    return [(p.location, p.message) for p in info.value.problems]


def test_all_schema_errors_at_once() -> None:
    found = problems(manifest(pipeline(
        "tree",
        stage("org.osbuild.noop"),
        {"type": "org.osbuild.truncate", "options": {"filename": "/x"}},
        stage("org.osbuild.nonexistent"),
        {"type": "org.osbuild.mkdir", "options": {"paths": [{"path": "/a", "bogus": 1}]}})))
    assert (".pipelines[0].stages[1].options", "'size' is a required property") in found
    assert (".pipelines[0].stages[2]", "could not find schema information for 'org.osbuild.nonexistent'") in found
    assert any(loc == ".pipelines[0].stages[3].options.paths[0]" for loc, _ in found)
    assert len(found) == 3


def test_top_level_schema() -> None:
    found = problems({"version": "2", "pipelines": [{"name": "a", "stages": [{}]}], "extra": 1})
    assert (".", "Additional properties are not allowed ('extra' was unexpected)") in found
    assert (".pipelines[0].stages[0]", "'type' is a required property") in found


def test_duplicate_names_unknown_and_later_references() -> None:
    tree_input = {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": ["name:late"]}
    found = problems(manifest(
        pipeline("a", stage("org.osbuild.noop")),
        pipeline("a", stage("org.osbuild.noop")),
        pipeline("b", {"type": "org.osbuild.copy", "options": COPY_OPTIONS, "inputs": {"t": tree_input}}),
        pipeline("c", stage("org.osbuild.noop"), build="name:nowhere"),
        pipeline("late", stage("org.osbuild.noop"))))
    locations = dict(found)
    assert locations[".pipelines[1].name"] == "duplicate pipeline name 'a'"
    assert "defined later" in locations[".pipelines[2].stages[0].inputs.t.references"]
    assert locations[".pipelines[3].build"] == "unknown pipeline reference 'name:nowhere'"


def test_unknown_source_reference() -> None:
    files = {"type": "org.osbuild.files", "origin": "org.osbuild.source",
             "references": {"sha256:" + "0" * 64: {}}}
    found = problems(manifest(pipeline("p", {"type": "org.osbuild.copy", "options": COPY_OPTIONS,
                                             "inputs": {"f": files}})))
    assert found == [(".pipelines[0].stages[0].inputs.f.references",
                      f"Unknown source reference(s) ['sha256:{'0' * 64}']")]


def test_device_parent_cycle() -> None:
    devices = {"a": {"type": "org.osbuild.loopback", "parent": "b", "options": {"filename": "x"}},
               "b": {"type": "org.osbuild.loopback", "parent": "a", "options": {"filename": "x"}}}
    found = problems(manifest(pipeline("p", {"type": "org.osbuild.noop", "devices": devices})))
    assert {loc for loc, _ in found} == {".pipelines[0].stages[0].devices.a.parent",
                                         ".pipelines[0].stages[0].devices.b.parent"}


def test_unsupported_version() -> None:
    assert problems({"version": "3"}) == [(".version", "Unsupported manifest format: version '3'")]


def test_malformed_json_names_line_and_column() -> None:
    with pytest.raises(ManifestError) as info:
        parse('{\n  "version": "2",\n  "pipelines": [,]\n}', "m.json")
    assert info.value.source == "m.json:3:17"
    assert "line 3, column 17" in info.value.render()


def test_cli_reports_validation_for_people_and_programs(aosbuild: Aosbuild) -> None:
    bad = manifest(pipeline("tree", {"type": "org.osbuild.truncate", "options": {"filename": "/x"}}))
    human = aosbuild(bad)
    assert human.returncode == 2
    assert ".pipelines[0].stages[0].options:\n  'size' is a required property" in human.stdout
    machine = aosbuild(bad, "--json")
    assert machine.returncode == 2
    document = json.loads(machine.stdout)
    assert document["type"] == "https://osbuild.org/validation-error"
    assert document["errors"] == [{"message": "'size' is a required property",
                                   "path": ["pipelines", 0, "stages", 0, "options"]}]
    assert not aosbuild.store.exists() or not any((aosbuild.store / "objects").iterdir())


def test_cli_malformed_json(aosbuild: Aosbuild) -> None:
    path = aosbuild.workdir / "broken.json"
    path.write_text('{"version": "2",, }')
    result = aosbuild(path)
    assert result.returncode == 2
    assert "broken.json:1:17" in result.stdout
    assert "Traceback" not in result.stderr


def test_cli_missing_file(aosbuild: Aosbuild) -> None:
    result = aosbuild(aosbuild.workdir / "nope.json")
    assert result.returncode == 2
    assert "cannot read" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_runner_is_refused_at_its_json_path() -> None:
    found = problems(manifest(pipeline("build", stage("org.osbuild.noop"), runner="org.osbuild.nosuchthing42"),
                              pipeline("os", stage("org.osbuild.noop"), build="name:build")))
    assert [loc for loc, _ in found] == [".pipelines[0].runner"]
    assert found[0][1].startswith("unknown runner 'org.osbuild.nosuchthing42'")
    v1 = {"pipeline": {"build": {"pipeline": {"stages": []}, "runner": "org.osbuild.debain12"}, "stages": []}}
    assert [loc for loc, _ in problems(v1)] == [".pipeline.build.runner"]


@pytest.mark.parametrize("command", [["--inspect"], ["--export", "os", "--output-directory", "out"]])
def test_an_unknown_runner_is_refused_before_anything_is_built(aosbuild: Aosbuild, command: list[str]) -> None:
    bad = manifest(pipeline("build", stage("org.osbuild.noop"), runner="org.osbuild.nosuchthing42"),
                   pipeline("os", stage("org.osbuild.noop"), build="name:build"))
    run = aosbuild(bad, *command)
    assert run.returncode == 2, run.stderr
    if command == ["--inspect"]:  # osbuild's validation result document
        errors = json.loads(run.stdout)["errors"]
        assert [e["path"] for e in errors] == [["pipelines", 0, "runner"]]
        assert errors[0]["message"].startswith("unknown runner 'org.osbuild.nosuchthing42'")
    else:
        assert ".pipelines[0].runner:\n  unknown runner 'org.osbuild.nosuchthing42'" in run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert not (aosbuild.store / "objects").exists()


def test_osbuild_refuses_the_runners_aosbuild_refuses(osbuild_oracle: OsbuildOracle, aosbuild: Aosbuild) -> None:
    """osbuild 191 refuses an unknown runner as it loads the manifest (with a traceback, exit 1), on any
    pipeline, used as a build root or not; it takes a runner its library has."""
    for runner, refused in (("org.osbuild.nosuchthing42", True), ("org.osbuild.fedora38", False)):
        path = aosbuild.write_manifest(manifest(pipeline("os", stage("org.osbuild.noop"), runner=runner)))
        theirs = osbuild_oracle("--inspect", str(path))
        assert (theirs.returncode != 0) == refused, theirs.stderr
        assert ("No suitable runner for org.osbuild.nosuchthing" in theirs.stderr) == refused
        ours = aosbuild(path, "--inspect")
        assert ours.returncode == (2 if refused else 0), ours.stderr
