"""v1 manifests: osbuild's nested v1 `--json` result, and the same image built from v1 and from v2."""

from __future__ import annotations

import json
from typing import Any

from .conftest import Aosbuild


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

    # everything cached: no pipeline ran, so none has stages; all count as successes
    again = aosbuild(m, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"success": True, "build": {"success": True}}


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
