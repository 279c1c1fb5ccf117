"""org.osbuild.chmod: numeric and symbolic modes, optionally recursive, on paths that must exist."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import assert_invalid, assert_refused, build_ab, export

# /d, /d/sub and /d/sub/f, with the modes given (independent of the umask)
BASE = [stage("org.osbuild.mkdir", paths=[{"path": "/d", "mode": 0o755}, {"path": "/d/sub", "mode": 0o755}]),
        stage("org.osbuild.truncate", filename="/d/sub/f", size="0"),
        stage("org.osbuild.chmod", items={"/d/sub/f": {"mode": "0644"}})]


def chmod(**items: dict[str, Any]) -> dict[str, Any]:
    return stage("org.osbuild.chmod", items=items)


@pytest.mark.parametrize(("mode", "expected"), [
    ("0600", 0o600), ("4755", 0o4755), ("u+x,go-r", 0o700), ("a=r", 0o444), ("-w", 0o444), ("+t", 0o1644)])
def test_changes_the_mode_of_a_file(aosbuild: Aosbuild, mode: str, expected: int) -> None:
    changes = build_ab(aosbuild, BASE, chmod(**{"/d/sub/f": {"mode": mode}}))
    assert (changes.added, changes.removed) == ({}, {})
    assert changes.changed == {"d/sub/f": {"mode": (0o644, expected)}}


def test_not_recursive_by_default(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, BASE, chmod(**{"/d": {"mode": "go-rwx"}}))
    assert changes.changed == {"d": {"mode": (0o755, 0o700)}}


def test_recursive(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, BASE, chmod(**{"/d": {"mode": "go-rwx", "recursive": True}}))
    assert changes.changed == {"d": {"mode": (0o755, 0o700)}, "d/sub": {"mode": (0o755, 0o700)},
                               "d/sub/f": {"mode": (0o644, 0o600)}}


def test_several_items_and_the_root(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, BASE, chmod(**{"/.": {"mode": "0700"}, "/d/sub/": {"mode": "0711"}}))
    assert changes.changed == {".": {"mode": (0o755, 0o700)}, "d/sub": {"mode": (0o755, 0o711)}}


def test_missing_path_fails(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", *BASE, chmod(**{"/d/nothing": {"mode": "0600"}}))))
    assert result.returncode == 1
    assert "chmod: '/d/nothing' does not exist in the tree" in result.stderr


def test_mode_chmod_cannot_read_fails(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", *BASE, chmod(**{"/d": {"mode": "rwx"}}))))
    assert result.returncode == 1
    assert "chmod: invalid mode" in result.stderr


def test_bad_options(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", chmod(**{"/d": {"mode": 0o644}}))))
    assert_invalid(result, ".pipelines[0].stages[0].options.items./d.mode", "420 is not of type 'string'")
    relative = aosbuild(manifest(pipeline("p", chmod(d={"mode": "0644"}))))
    assert_invalid(relative, ".pipelines[0].stages[0].options.items",
                   "'d' does not match any of the regexes")


def test_climbing_path_is_invalid(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", chmod(**{"/../etc": {"mode": "0777"}}))))
    assert_invalid(result, ".pipelines[0].stages[0].options.items",
                   "'/../etc' does not match any of the regexes")


def test_escape_past_the_schema_is_refused(aosbuild: Aosbuild) -> None:
    # "//.." matches the schema's pattern (no "/../" in it), so the stage itself must refuse it
    result = export(aosbuild, manifest(pipeline("p", *BASE, chmod(**{"//..": {"mode": "0777"}}))), "p")
    assert_refused(aosbuild, result, "escaped")
