"""org.osbuild.groups: groupadd --root on a Debian-like /etc, with and without gids and force."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .accounts import debian_etc, entries
from .treediff import assert_invalid, build_ab

HOST_GIDS = {int(fields[2]) for fields in entries(Path("/"), "group").values()}


def test_adds_groups(aosbuild: Aosbuild) -> None:
    groups = stage("org.osbuild.groups", groups={"devs": {"gid": 4242}, "ops": {}})
    changes = build_ab(aosbuild, [debian_etc()], groups)
    assert {"etc/group", "etc/gshadow"} <= set(changes.changed)
    b = aosbuild.output / "b"
    group, gshadow = entries(b, "group"), entries(b, "gshadow")
    assert group["devs"] == ["devs", "x", "4242", ""]
    assert gshadow["devs"] == ["devs", "!", "", ""]
    ops_gid = int(group["ops"][2])
    assert 1000 <= ops_gid <= 60000  # GID_MIN..GID_MAX of Debian's login.defs
    assert ops_gid not in HOST_GIDS
    assert set(group) == set(entries(aosbuild.output / "a", "group")) | {"devs", "ops"}


def test_existing_group_fails_without_force(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", debian_etc(), stage("org.osbuild.groups", groups={"users": {}}))))
    assert result.returncode == 1
    assert "group 'users' already exists" in result.stdout + result.stderr


def test_force_accepts_an_existing_group_and_a_taken_gid(aosbuild: Aosbuild) -> None:
    groups = stage("org.osbuild.groups", force=True, groups={"users": {"gid": 5000}, "new": {"gid": 100}})
    build_ab(aosbuild, [debian_etc()], groups)
    before, after = entries(aosbuild.output / "a", "group"), entries(aosbuild.output / "b", "group")
    assert after["users"] == before["users"]  # left as it was, gid and all
    assert after["new"][2] not in ("100", "")  # users has 100: another one was chosen


def test_bad_options(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.groups", groups={"-bad": {}}))))
    assert_invalid(result, ".pipelines[0].stages[0].options.groups", "'-bad' does not match any of the regexes")
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.groups", groups={"g": {"gid": "7"}}))))
    assert_invalid(result, ".pipelines[0].stages[0].options.groups.g.gid", "'7' is not of type 'number'")
