"""org.osbuild.resolv-conf: /etc/resolv.conf replaced (symlinks too) with search and nameserver lines."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import assert_invalid, build_ab, umask

HEADER = "# This file was created by osbuild\n"


@pytest.mark.parametrize(("options", "text"), [
    ({"nameserver": ["192.0.2.1", "2001:db8::1"], "search": ["example.com", "example.org"]},
     "search example.com example.org\nnameserver 192.0.2.1\nnameserver 2001:db8::1\n"),
    ({"nameserver": ["192.0.2.1"]}, "nameserver 192.0.2.1\n"),
    ({}, ""),
])
def test_writes_resolv_conf(aosbuild: Aosbuild, options: dict[str, Any], text: str) -> None:
    changes = build_ab(aosbuild, [], stage("org.osbuild.resolv-conf", **options))
    assert set(changes.added) == {"etc", "etc/resolv.conf"}
    assert changes.added["etc/resolv.conf"].mode == 0o644 & ~umask()
    assert (aosbuild.output / "b" / "etc" / "resolv.conf").read_text() == HEADER + text


def test_replaces_a_symlink_without_following_it(aosbuild: Aosbuild) -> None:
    # as systemd-resolved leaves it; the link's target (in the sandbox, not the tree) is never written
    base = [stage("org.osbuild.mkdir", paths=[{"path": "/etc"}]),
            stage("org.osbuild.ln", paths=[{"target": "../run/systemd/resolve/stub-resolv.conf",
                                            "link_name": "tree:///etc/resolv.conf", "symbolic": True}])]
    changes = build_ab(aosbuild, base, stage("org.osbuild.resolv-conf", nameserver=["192.0.2.53"]))
    assert changes.changed["etc/resolv.conf"]["kind"] == ("symlink", "file")
    assert (aosbuild.output / "b" / "etc" / "resolv.conf").read_text() == HEADER + "nameserver 192.0.2.53\n"


def test_says_it_replaces(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.resolv-conf"), stage("org.osbuild.resolv-conf"))))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Replacing existing file: /etc/resolv.conf") == 1


def test_a_second_line_fails(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.resolv-conf", search=["a\noptions debug"]))))
    assert result.returncode == 1
    assert "must be one line each" in result.stderr


def test_bad_options(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.resolv-conf", nameserver="192.0.2.1"))))
    assert_invalid(result, ".pipelines[0].stages[0].options.nameserver", "'192.0.2.1' is not of type 'array'")
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.resolv-conf", options=["rotate"]))))
    assert_invalid(result, ".pipelines[0].stages[0].options", "Additional properties are not allowed")
