"""v1 manifests: osbuild's nested v1 `--json` result, and the same image built from v1 and from v2."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

from .conftest import Aosbuild, manifest, pipeline
from .test_build import started_stages


def v1(*stages: dict[str, Any], build: list[dict[str, Any]] | None = None,
       assembler: dict[str, Any] | None = None, sources: dict[str, Any] | None = None) -> dict[str, Any]:
    pipeline: dict[str, Any] = {"stages": list(stages)}
    if build is not None:
        pipeline["build"] = {"pipeline": {"stages": build}, "runner": "org.osbuild.linux"}
    if assembler is not None:
        pipeline["assembler"] = assembler
    return {"pipeline": pipeline, **({"sources": sources} if sources else {})}


def v1_stage(name: str, **options: Any) -> dict[str, Any]:
    return {"name": name, "options": options}


BUILD_ROOT = [v1_stage("org.aosbuild.test.buildroot")]


def test_v1_json_result(aosbuild: Aosbuild) -> None:
    m = v1(v1_stage("org.osbuild.mkdir", paths=[{"path": "/a"}]), v1_stage("org.aosbuild.test.report", answer=7),
           build=BUILD_ROOT, assembler=v1_stage("org.osbuild.noop"))
    described = json.loads(aosbuild(m, "--inspect").stdout)
    result = aosbuild(m, "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) == {"success", "build", "stages", "assembler"}
    assert document["success"] is True
    assert set(document["build"]) == {"success", "stages"}
    assert [s["type"] for s in document["build"]["stages"]] == ["org.aosbuild.test.buildroot"]
    stages = document["stages"]
    assert [s["type"] for s in stages] == ["org.osbuild.mkdir", "org.aosbuild.test.report"]
    assert [s["id"] for s in stages] == [s["id"] for s in described["pipeline"]["stages"]]
    for entry in [*stages, *document["build"]["stages"], document["assembler"]]:
        assert set(entry) == {"id", "type", "success", "error", "output", "metadata"}
        assert entry["success"] is True
        assert entry["error"] is None
    assert stages[0]["metadata"] is None
    assert stages[1]["metadata"] == {"answer": 7, "big": ""}
    assert "logged through the channel" in stages[1]["output"]
    assert document["assembler"]["type"] == "org.osbuild.noop"
    assert document["assembler"]["id"] == described["pipeline"]["assembler"]["id"]

    # everything cached: the stages are reported as the build that stored the trees reported them
    # (osbuild reports none: a cached pipeline has no stages in its document)
    again = aosbuild(m, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == document


def test_v1_json_failing_stage(aosbuild: Aosbuild) -> None:
    m = v1(v1_stage("org.osbuild.noop"), v1_stage("org.aosbuild.test.fail", exit=3),
           build=BUILD_ROOT, assembler=v1_stage("org.osbuild.noop"))
    result = aosbuild(m, "--json")
    assert result.returncode == 1
    document = json.loads(result.stdout)
    assert document["success"] is False
    assert document["build"]["success"] is True
    assert "assembler" not in document  # never reached
    assert [(s["type"], s["success"]) for s in document["stages"]] == [
        ("org.osbuild.noop", True), ("org.aosbuild.test.fail", False)]
    assert all(s["metadata"] is None for s in document["stages"])  # nothing was committed


def test_v1_json_failed_download_still_says_success(aosbuild: Aosbuild) -> None:
    """osbuild's quirk: a v1 result shows success when only the download failed; the exit code is 1."""
    checksum = "sha256:" + "0" * 64
    m = v1(v1_stage("org.osbuild.noop"), sources={"org.osbuild.files": {"urls": {checksum: "http://127.0.0.1:9/x"}}})
    result = aosbuild(m, "--json", "--export", "tree", "--output-directory", str(aosbuild.output))
    assert result.returncode == 1
    document = json.loads(result.stdout)
    assert document["success"] is True
    assert "type" not in document


def tar_members(path: Path) -> list[tuple[str, int, int, bytes | str | None]]:
    """Name, type, mode and content (or link target) of each member: everything but times and owners."""
    with tarfile.open(path) as tar:
        members = []
        for member in tar.getmembers():
            data = tar.extractfile(member)
            content: bytes | str | None = data.read() if data is not None else (member.linkname or None)
            members.append((member.name, int.from_bytes(member.type, "big"), member.mode, content))
        return sorted(members)


def test_v1_and_v2_build_the_same_image(workdir: Path) -> None:
    """The same image as a v1 manifest (build pipeline, tree, tar assembler) and as v2: same ids, same archive."""
    build_root = [v1_stage("org.aosbuild.test.buildroot", programs=["tar", "truncate"])]
    data_dir = {"path": "/srv/data", "mode": 0o700, "parents": True}
    tree_stages = [v1_stage("org.osbuild.mkdir", paths=[{"path": "/etc"}, data_dir]),
                   v1_stage("org.osbuild.hostname", hostname="same"),
                   v1_stage("org.osbuild.truncate", filename="/srv/data/blob", size="4096")]
    old = v1(*tree_stages, build=build_root, assembler=v1_stage("org.osbuild.tar", filename="image.tar"))

    def v2_stages(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"type": s["name"], "options": s["options"]} for s in stages]

    tree_input = {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": ["name:tree"]}
    new = manifest(
        pipeline("build", *v2_stages(build_root), runner="org.osbuild.linux"),
        pipeline("tree", *v2_stages(tree_stages), build="name:build"),
        pipeline("assembler", {"type": "org.osbuild.tar", "options": {"filename": "image.tar"},
                               "inputs": {"tree": tree_input}}, build="name:build"))

    v1_run, v2_run = Aosbuild(workdir / "v1"), Aosbuild(workdir / "v2")  # separate stores: both really build
    archives = []
    for run, description in ((v1_run, old), (v2_run, new)):
        run.workdir.mkdir()
        result = run(description, "--export", "assembler", "--output-directory", str(run.output),
                     "--monitor", "JSONSeqMonitor")
        assert result.returncode == 0, result.stderr
        assert len(started_stages(result.jsonseq())) == 5  # build root, three tree stages, the archive
        archives.append(run.output / "assembler" / "image.tar")

    old_ids = json.loads(v1_run(old, "--inspect").stdout)
    new_ids = json.loads(v2_run(new, "--inspect").stdout)
    assert old_ids["pipeline"]["assembler"]["id"] == new_ids["pipelines"][2]["stages"][0]["id"]
    assert [s["id"] for s in old_ids["pipeline"]["stages"]] == [s["id"] for s in new_ids["pipelines"][1]["stages"]]

    members = tar_members(archives[0])
    assert members == tar_members(archives[1])
    names = [name for name, *_ in members]
    assert "./etc/hostname" in names
    assert next(m for m in members if m[0] == "./srv/data/blob")[3] == b"\0" * 4096
