"""org.osbuild.hostname: /etc/hostname in the tree, for names systemd accepts."""

from __future__ import annotations

import hashlib

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import Node, assert_invalid, build_ab, umask


def hostname_file(name: str) -> Node:
    content = f"{name}\n".encode()
    return Node("file", 0o644 & ~umask(), size=len(content), sha256=hashlib.sha256(content).hexdigest())


@pytest.mark.parametrize("name", ["example", "web-01.example.com", "1", "a" * 64, "a--b"])
def test_writes_etc_hostname(aosbuild: Aosbuild, name: str) -> None:
    changes = build_ab(aosbuild, [], stage("org.osbuild.hostname", hostname=name))
    assert changes.added == {"etc": Node("dir", 0o755 & ~umask()), "etc/hostname": hostname_file(name)}
    assert (changes.removed, changes.changed) == ({}, {})
    assert (aosbuild.output / "b" / "etc" / "hostname").read_text() == f"{name}\n"


def test_keeps_an_existing_etc(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.mkdir", paths=[{"path": "/etc", "mode": 0o700}])]
    changes = build_ab(aosbuild, base, stage("org.osbuild.hostname", hostname="example"))
    assert changes.added == {"etc/hostname": hostname_file("example")}
    assert changes.changed == {}  # /etc keeps its mode


def test_replaces_an_existing_file(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.hostname", hostname="old"),
            stage("org.osbuild.chmod", items={"/etc/hostname": {"mode": "0600"}})]
    changes = build_ab(aosbuild, base, stage("org.osbuild.hostname", hostname="new"))
    assert (changes.added, changes.removed) == ({}, {})
    old, new = b"old\n", hostname_file("new")
    assert changes.changed == {"etc/hostname": {"mode": (0o600, new.mode),
                                                "sha256": (hashlib.sha256(old).hexdigest(), new.sha256)}}


def test_says_it_replaces(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.hostname", hostname="old"),
                                        stage("org.osbuild.hostname", hostname="new"))))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("/etc/hostname already exists. Replacing.") == 1


@pytest.mark.parametrize("name", ["", "-lead", "trail-", "a.-b", "a..b", "a.", "a" * 65, "under_score", "ünï",
                                  "new\nline"])
def test_invalid_hostname_fails(aosbuild: Aosbuild, name: str) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.hostname", hostname=name))))
    assert result.returncode == 1
    assert "invalid hostname" in result.stderr


def test_bad_options(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.hostname"))))
    assert_invalid(result, ".pipelines[0].stages[0].options", "'hostname' is a required property")
    number = aosbuild(manifest(pipeline("p", stage("org.osbuild.hostname", hostname=42))))
    assert_invalid(number, ".pipelines[0].stages[0].options.hostname", "42 is not of type 'string'")
