"""org.osbuild.untar: an archive from a files input, extracted into the tree or a prefix in it."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
from typing import Any

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import Node, assert_invalid, assert_refused, build_ab, export

# pipeline "archive" holds /archive.tar.xz of pipeline "content": /d (0750) with /d/f (3 bytes, 0600)
CONTENT = pipeline("content",
                   stage("org.osbuild.mkdir", paths=[{"path": "/d", "mode": 0o750}]),
                   stage("org.osbuild.truncate", filename="/d/f", size="3"),
                   stage("org.osbuild.chmod", items={"/d/f": {"mode": "0600"}}))
ARCHIVE = pipeline("archive", {
    **stage("org.osbuild.tar", filename="/archive.tar.xz", **{"root-node": "omit"}),
    "inputs": {"tree": {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline",
                        "references": ["name:content"]}}})
FROM_PIPELINE = {"type": "org.osbuild.files", "origin": "org.osbuild.pipeline",
                 "references": {"name:archive": {"file": "/archive.tar.xz"}}}
EXTRACTED = {"d": Node("dir", 0o750), "d/f": Node("file", 0o600, size=3, sha256=hashlib.sha256(bytes(3)).hexdigest())}


def untar(file_input: dict[str, Any], **options: Any) -> dict[str, Any]:
    return {**stage("org.osbuild.untar", **options), "inputs": {"file": file_input}}


def test_extracts_into_the_tree(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, [], untar(FROM_PIPELINE), others=(CONTENT, ARCHIVE))
    assert changes.added == EXTRACTED
    assert (changes.removed, changes.changed) == ({}, {})


def test_extracts_below_a_prefix(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.mkdir", paths=[{"path": "/srv/data", "parents": True}])]
    changes = build_ab(aosbuild, base, untar(FROM_PIPELINE, prefix="/srv/data"), others=(CONTENT, ARCHIVE))
    assert changes.added == {f"srv/data/{path}": node for path, node in EXTRACTED.items()}


def test_missing_prefix_fails(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(CONTENT, ARCHIVE, pipeline("p", untar(FROM_PIPELINE, prefix="/nowhere"))))
    assert result.returncode == 1
    assert "nowhere" in result.stderr


def test_escaping_prefix_is_refused(aosbuild: Aosbuild) -> None:
    result = export(aosbuild, manifest(CONTENT, ARCHIVE, pipeline("p", untar(FROM_PIPELINE, prefix="/../escaped"))),
                    "p")
    assert_refused(aosbuild, result, "escaped")


def test_member_climbing_out_is_refused(aosbuild: Aosbuild) -> None:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as archive:
        member = tarfile.TarInfo("../../escaped")
        member.size = 1
        archive.addfile(member, io.BytesIO(b"x"))
    checksum = "sha256:" + hashlib.sha256(data.getvalue()).hexdigest()
    sources = {"org.osbuild.inline": {"items": {checksum: {"encoding": "base64",
                                                           "data": base64.b64encode(data.getvalue()).decode()}}}}
    from_source = {"type": "org.osbuild.files", "origin": "org.osbuild.source", "references": {checksum: {}}}
    result = export(aosbuild, manifest(pipeline("p", untar(from_source)), sources=sources), "p")
    assert_refused(aosbuild, result, "escaped", reason="Member name contains '..'")


def test_needs_exactly_one_file(aosbuild: Aosbuild) -> None:
    two = {**FROM_PIPELINE, "references": {"name:archive": {"file": "/archive.tar.xz"},
                                           "name:content": {"file": "/d/f"}}}
    result = aosbuild(manifest(CONTENT, ARCHIVE, pipeline("p", untar(two))))
    assert result.returncode == 1
    assert "the input 'file' must hold exactly one archive, it holds 2" in result.stderr
    result = aosbuild(manifest(pipeline("p", {**stage("org.osbuild.untar"), "inputs": {}})))
    assert_invalid(result, ".pipelines[0].stages[0].inputs", "'file' is a required property")
