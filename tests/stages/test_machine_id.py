"""org.osbuild.machine-id: "uninitialized", empty, or the existing /etc/machine-id kept."""

from __future__ import annotations

import hashlib

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import Node, assert_invalid, build_ab, umask


def machine_id(content: bytes) -> Node:
    return Node("file", 0o666 & ~umask(), size=len(content), sha256=hashlib.sha256(content).hexdigest())


@pytest.mark.parametrize(("first_boot", "content"), [("yes", b"uninitialized\n"), ("no", b"")])
def test_writes_machine_id(aosbuild: Aosbuild, first_boot: str, content: bytes) -> None:
    changes = build_ab(aosbuild, [], stage("org.osbuild.machine-id", **{"first-boot": first_boot}))
    assert changes.added == {"etc": Node("dir", 0o755 & ~umask()), "etc/machine-id": machine_id(content)}
    assert (changes.removed, changes.changed) == ({}, {})


def test_replaces_an_existing_id(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.mkdir", paths=[{"path": "/etc"}]),
            stage("org.osbuild.truncate", filename="/etc/machine-id", size="33")]
    changes = build_ab(aosbuild, base, stage("org.osbuild.machine-id", **{"first-boot": "yes"}))
    assert (changes.added, changes.removed) == ({}, {})
    assert changes.changed["etc/machine-id"]["size"] == (33, len(b"uninitialized\n"))
    assert "mode" not in changes.changed["etc/machine-id"]  # rewritten in place, as osbuild does


def test_preserve_keeps_the_file(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.machine-id", **{"first-boot": "no"})]
    changes = build_ab(aosbuild, base, stage("org.osbuild.machine-id", **{"first-boot": "preserve"}))
    assert (changes.added, changes.removed, changes.changed) == ({}, {}, {})


def test_preserve_without_a_file_fails(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.machine-id", **{"first-boot": "preserve"}))))
    assert result.returncode == 1
    assert "/etc/machine-id cannot be preserved, it does not exist" in result.stderr


def test_bad_options(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.machine-id"))))
    assert_invalid(result, ".pipelines[0].stages[0].options", "'first-boot' is a required property")
    other = aosbuild(manifest(pipeline("p", stage("org.osbuild.machine-id", **{"first-boot": "maybe"}))))
    assert_invalid(other, ".pipelines[0].stages[0].options.first-boot", "'maybe' is not one of")
