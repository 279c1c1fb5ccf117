"""org.osbuild.truncate: create, shrink or extend a file in the tree to a size truncate(1) reads."""

from __future__ import annotations

import hashlib

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import Node, assert_invalid, assert_refused, build_ab, export, umask


def zeros(size: int) -> Node:
    return Node("file", 0o666 & ~umask(), size=size, sha256=hashlib.sha256(bytes(size)).hexdigest())


@pytest.mark.parametrize("filename", ["/empty", "empty"])
def test_creates_an_empty_file(aosbuild: Aosbuild, filename: str) -> None:
    changes = build_ab(aosbuild, [], stage("org.osbuild.truncate", filename=filename, size="0"))
    assert changes.added == {"empty": zeros(0)}
    assert (changes.removed, changes.changed) == ({}, {})


def test_creates_a_sparse_file_of_a_size_with_a_unit(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.mkdir", paths=[{"path": "/img"}])]
    changes = build_ab(aosbuild, base, stage("org.osbuild.truncate", filename="/img/disk.raw", size="1M"))
    assert changes.added == {"img/disk.raw": zeros(1 << 20)}
    assert changes.changed == {}
    st = (aosbuild.output / "b" / "img" / "disk.raw").stat()
    assert st.st_blocks * 512 < st.st_size  # a hole, not a megabyte of written zeros


@pytest.mark.parametrize(("size", "content"), [("3", b"exa"), ("+2", b"example\n\0\0"), ("12", b"example\n\0\0\0\0")])
def test_shrinks_and_extends_an_existing_file(aosbuild: Aosbuild, size: str, content: bytes) -> None:
    base = [stage("org.osbuild.hostname", hostname="example")]
    changes = build_ab(aosbuild, base, stage("org.osbuild.truncate", filename="/etc/hostname", size=size))
    assert (changes.added, changes.removed) == ({}, {})
    assert changes.changed == {"etc/hostname": {
        "size": (8, len(content)),
        "sha256": (hashlib.sha256(b"example\n").hexdigest(), hashlib.sha256(content).hexdigest())}}
    assert (aosbuild.output / "b" / "etc" / "hostname").read_bytes() == content


def test_size_truncate_cannot_read_fails(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.truncate", filename="/f", size="ten"))))
    assert result.returncode == 1
    assert "truncate: invalid number" in result.stderr.lower()  # the tool's own message, in the error


def test_bad_options(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.truncate", filename="/f"))))
    assert_invalid(result, ".pipelines[0].stages[0].options", "'size' is a required property")
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.truncate", filename="/f", size=10))))
    assert_invalid(result, ".pipelines[0].stages[0].options.size", "10 is not of type 'string'")


@pytest.mark.parametrize("filename", ["../../etc/escaped", "/../escaped", "/a/../../escaped"])
def test_escape_is_refused(aosbuild: Aosbuild, filename: str) -> None:
    result = export(aosbuild, manifest(pipeline("p", stage("org.osbuild.truncate", filename=filename, size="1"))),
                    "p")
    assert_refused(aosbuild, result, "escaped")
