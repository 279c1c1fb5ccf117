"""org.osbuild.ln: symlinks stored as given, hard links within the link's root."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import Node, assert_invalid, assert_refused, build_ab, export, umask

# /etc/hostname (a file) and /usr/bin (a directory)
BASE = [stage("org.osbuild.hostname", hostname="example"),
        stage("org.osbuild.mkdir", paths=[{"path": "/usr/bin", "parents": True}])]


def ln(*paths: dict[str, Any]) -> dict[str, Any]:
    return stage("org.osbuild.ln", paths=list(paths))


def test_symbolic_links_hold_the_target_as_given(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, BASE, ln(
        {"target": "usr/bin", "link_name": "tree:///bin", "symbolic": True},
        {"target": "/nowhere/at/all", "link_name": "tree:///etc/dangling", "symbolic": True},
        {"target": "../../etc/hostname", "link_name": "tree:///usr/bin/name", "symbolic": True}))
    assert changes.added == {"bin": Node("symlink", 0o777, target="usr/bin"),
                             "etc/dangling": Node("symlink", 0o777, target="/nowhere/at/all"),
                             "usr/bin/name": Node("symlink", 0o777, target="../../etc/hostname")}
    assert (changes.removed, changes.changed) == ({}, {})


@pytest.mark.parametrize("target", ["/etc/hostname", "../../etc/hostname"])
def test_hard_link_to_a_file_in_the_tree(aosbuild: Aosbuild, target: str) -> None:
    changes = build_ab(aosbuild, BASE, ln({"target": target, "link_name": "tree:///usr/bin/name"}))
    assert list(changes.added) == ["usr/bin/name"]
    assert changes.added["usr/bin/name"].size == len("example\n")
    assert changes.changed == {}  # the link count is not compared
    b = aosbuild.output / "b"
    assert (b / "usr/bin/name").stat().st_ino == (b / "etc/hostname").stat().st_ino
    assert (b / "etc/hostname").stat().st_nlink == 2
    assert changes.added["usr/bin/name"].mode == 0o644 & ~umask()


def test_existing_link_name_fails(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", *BASE, ln({"target": "x", "link_name": "tree:///etc/hostname",
                                                        "symbolic": True}))))
    assert result.returncode == 1
    assert "FileExistsError" in result.stderr


@pytest.mark.parametrize("item", [
    {"target": "x", "link_name": "tree:///../escaped", "symbolic": True},
    {"target": "../../../../../../etc/passwd", "link_name": "tree:///usr/bin/escaped"},
    {"target": "/../etc/passwd", "link_name": "tree:///escaped"},
])
def test_escape_is_refused(aosbuild: Aosbuild, item: dict[str, Any]) -> None:
    result = export(aosbuild, manifest(pipeline("p", *BASE, ln(item))), "p")
    assert_refused(aosbuild, result, "escaped")


def test_bad_options(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", ln({"target": "x", "link_name": "/etc/x"}))))
    assert_invalid(result, ".pipelines[0].stages[0].options.paths[0].link_name", "'/etc/x' is not valid")
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.ln", paths=[]))))
    assert_invalid(result, ".pipelines[0].stages[0].options.paths", "[] should be non-empty")
