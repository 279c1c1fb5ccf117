"""org.osbuild.mkdir: directories in the tree, with modes, parents and exist_ok."""

from __future__ import annotations

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import Node, assert_invalid, assert_refused, build_ab, export, umask


def directory(mode: int) -> Node:
    return Node("dir", mode)


def test_creates_directories(aosbuild: Aosbuild) -> None:
    default = 0o777 & ~umask()
    mkdir = stage("org.osbuild.mkdir", paths=[
        {"path": "/private", "mode": 0o700},
        {"path": "/a/b/c", "parents": True, "mode": 0o750},
        {"path": "tree:///loc"},
        {"path": "/trailing/"},
    ])
    changes = build_ab(aosbuild, [], mkdir)
    assert changes.added == {"private": directory(0o700), "a": directory(default), "a/b": directory(default),
                             "a/b/c": directory(0o750), "loc": directory(default),
                             "trailing": directory(default)}
    assert (changes.removed, changes.changed) == ({}, {})


def test_relative_path_is_in_the_tree_with_a_warning(aosbuild: Aosbuild) -> None:
    result = export(aosbuild, manifest(pipeline("p", stage("org.osbuild.mkdir", paths=[{"path": "rel"}]))), "p")
    assert result.returncode == 0, result.stderr
    assert (aosbuild.output / "p" / "rel").is_dir()
    assert "WARNING: relative path 'rel' is taken relative to the tree; write '/rel'" in result.stdout


def test_missing_parent_fails_without_parents(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.mkdir", paths=[{"path": "/no/such"}]))))
    assert result.returncode == 1
    assert "FileNotFoundError" in result.stderr


@pytest.mark.parametrize("parents", [False, True])
def test_exist_ok_leaves_an_existing_directory_alone(aosbuild: Aosbuild, parents: bool) -> None:
    base = [stage("org.osbuild.mkdir", paths=[{"path": "/d", "mode": 0o700}])]
    again = stage("org.osbuild.mkdir", paths=[{"path": "/d", "mode": 0o755, "exist_ok": True, "parents": parents}])
    changes = build_ab(aosbuild, base, again)
    assert (changes.added, changes.removed, changes.changed) == ({}, {}, {})  # not even the mode


@pytest.mark.parametrize("parents", [False, True])
def test_existing_directory_is_an_error_without_exist_ok(aosbuild: Aosbuild, parents: bool) -> None:
    mkdir = stage("org.osbuild.mkdir", paths=[{"path": "/d", "parents": parents}])
    result = aosbuild(manifest(pipeline("p", mkdir, mkdir)))
    assert result.returncode == 1
    assert "FileExistsError" in result.stderr


@pytest.mark.parametrize("parents", [False, True])
def test_exist_ok_does_not_accept_a_file(aosbuild: Aosbuild, parents: bool) -> None:
    result = aosbuild(manifest(pipeline(
        "p", stage("org.osbuild.truncate", filename="/f", size="0"),
        stage("org.osbuild.mkdir", paths=[{"path": "/f", "exist_ok": True, "parents": parents}]))))
    assert result.returncode == 1
    assert "FileExistsError" in result.stderr


def test_bad_options(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.mkdir", paths=[{"path": "/d", "mode": "0755"}]))))
    assert_invalid(result, ".pipelines[0].stages[0].options.paths[0].mode", "'0755' is not of type 'number'")


def test_climbing_plain_path_is_invalid(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.mkdir", paths=[{"path": "../../etc/escaped"}]))))
    assert result.returncode == 2
    assert ".pipelines[0].stages[0].options.paths[0].path:\n  '../../etc/escaped' is not valid" in result.stdout


@pytest.mark.parametrize("path", ["tree:///../escaped", "tree:///a/../../../escaped", "//..",
                                  "mount:///../escaped"])
def test_escape_is_refused(aosbuild: Aosbuild, path: str) -> None:
    result = export(aosbuild, manifest(pipeline("p", stage("org.osbuild.mkdir", paths=[{"path": path}]))), "p")
    assert_refused(aosbuild, result, "escaped")
