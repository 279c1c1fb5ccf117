"""org.osbuild.timezone: /etc/localtime links into zoneinfo; no /etc/timezone, as osbuild."""

from __future__ import annotations

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import Node, assert_invalid, build_ab, umask


def localtime(zone: str) -> Node:
    return Node("symlink", 0o777, target=f"../usr/share/zoneinfo/{zone}")


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/Argentina/Buenos_Aires", "Etc/GMT+5"])
def test_links_localtime(aosbuild: Aosbuild, zone: str) -> None:
    changes = build_ab(aosbuild, [], stage("org.osbuild.timezone", zone=zone))
    assert changes.added == {"etc": Node("dir", 0o755 & ~umask()), "etc/localtime": localtime(zone)}
    assert (changes.removed, changes.changed) == ({}, {})


def test_replaces_an_earlier_zone(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.timezone", zone="UTC")]
    changes = build_ab(aosbuild, base, stage("org.osbuild.timezone", zone="Asia/Tokyo"))
    assert (changes.added, changes.removed) == ({}, {})
    assert changes.changed["etc/localtime"] == {"target": ("../usr/share/zoneinfo/UTC",
                                                           "../usr/share/zoneinfo/Asia/Tokyo")}


@pytest.mark.parametrize("zone", ["Nowhere/City", "", "../../etc/passwd", "Europe", "Europe/Berlin/"])
def test_unknown_zone_fails(aosbuild: Aosbuild, zone: str) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.timezone", zone=zone))))
    assert result.returncode == 1
    assert f"unknown time zone '{zone}'" in result.stderr


def test_bad_options(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.timezone"))))
    assert_invalid(result, ".pipelines[0].stages[0].options", "'zone' is a required property")
    number = aosbuild(manifest(pipeline("p", stage("org.osbuild.timezone", zone=1))))
    assert_invalid(number, ".pipelines[0].stages[0].options.zone", "1 is not of type 'string'")
