"""org.osbuild.chown: owners by the tree's account names or by number, recursive, never through symlinks."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .accounts import debian_etc
from .treediff import assert_invalid, assert_refused, build_ab, export

# a Debian /etc with the group "devs" (2345) and the user "app" (2345:2345), and /srv/d/f, /srv/link -> /etc
BASE = [debian_etc(),
        stage("org.osbuild.groups", groups={"devs": {"gid": 2345}}),
        stage("org.osbuild.users", users={"app": {"uid": 2345, "gid": 2345, "home": ""}}),
        stage("org.osbuild.mkdir", paths=[{"path": "/srv/d", "parents": True}]),
        stage("org.osbuild.truncate", filename="/srv/d/f", size="0"),
        stage("org.osbuild.ln", paths=[{"target": "/etc", "link_name": "tree:///srv/link", "symbolic": True}])]


def chown(**items: dict[str, Any]) -> dict[str, Any]:
    return stage("org.osbuild.chown", items=items)


def owners(changes: Any) -> dict[str, tuple[Any, Any]]:
    return {path: (fields.get("uid", (None, None))[1], fields.get("gid", (None, None))[1])
            for path, fields in changes.changed.items()}


@pytest.mark.parametrize(("item", "expected"), [
    ({"user": "app"}, (2345, None)),
    ({"group": "devs"}, (None, 2345)),
    ({"user": "app", "group": "devs"}, (2345, 2345)),
    ({"user": 4000, "group": 4001}, (4000, 4001)),
    ({"user": "4002"}, (4002, None)),
    ({"user": "daemon", "group": "adm"}, (1, 4)),  # Debian's fixed ids, from the tree's files
])
def test_changes_the_owner(aosbuild: Aosbuild, item: dict[str, Any], expected: tuple[Any, Any]) -> None:
    changes = build_ab(aosbuild, BASE, chown(**{"/srv/d": item}))
    assert (changes.added, changes.removed) == ({}, {})
    assert owners(changes) == {"srv/d": expected}


def test_recursive(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, BASE, chown(**{"/srv": {"user": "app", "group": "devs", "recursive": True}}))
    both = (2345, 2345)
    assert owners(changes) == {"srv": both, "srv/d": both, "srv/d/f": both, "srv/link": both}


def test_a_symlink_itself_changes_not_its_target(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, BASE, chown(**{"/srv/link": {"user": "app"}}))
    assert owners(changes) == {"srv/link": (2345, None)}  # /etc (in the tree or not) is left alone


def test_unknown_name_fails(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", *BASE, chown(**{"/srv/d": {"user": "nobody-here"}}))))
    assert result.returncode == 1
    assert "chown: no user 'nobody-here' in the tree's /etc/passwd" in result.stderr


def test_missing_path_fails(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", *BASE, chown(**{"/srv/none": {"user": 0}}))))
    assert result.returncode == 1
    assert "chown: '/srv/none' does not exist in the tree" in result.stderr


def test_escape_past_the_schema_is_refused(aosbuild: Aosbuild) -> None:
    result = export(aosbuild, manifest(pipeline("p", *BASE, chown(**{"//..": {"user": 0}}))), "p")
    assert_refused(aosbuild, result, "escaped")


def test_bad_options(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", chown(**{"/srv": {"recursive": True}}))))
    assert_invalid(result, ".pipelines[0].stages[0].options.items./srv", "{'recursive': True} is not valid")
    result = aosbuild(manifest(pipeline("p", chown(**{"srv": {"user": 0}}))))
    assert_invalid(result, ".pipelines[0].stages[0].options.items", "'srv' does not match any of the regexes")
    result = aosbuild(manifest(pipeline("p", chown(**{"/srv": {"user": -1}}))))
    assert_invalid(result, ".pipelines[0].stages[0].options.items./srv.user", "-1 is not valid")
