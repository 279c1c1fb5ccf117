"""org.osbuild.keymap: /etc/vconsole.conf as systemd-firstboot writes it, X's 00-keyboard.conf, as osbuild."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import Node, assert_invalid, build_ab, umask

XORG = ('# Created by osbuild. Do not edit manually, use localectl(1).\nSection "InputClass"\n'
        '        Identifier "system-keyboard"\n        MatchIsKeyboard "on"\n        Option "XkbLayout" "{}"\n'
        'EndSection\n')


@pytest.mark.parametrize(("options", "vconsole"), [
    ({"keymap": "de-latin1"}, "KEYMAP=de-latin1\n"),
    ({"keymap": "de-latin1-nodeadkeys", "font": "eurlatgr"}, "KEYMAP=de-latin1-nodeadkeys\nFONT=eurlatgr\n"),
    ({"keymap": "not-in-any-map"}, "KEYMAP=not-in-any-map\n"),
])
def test_writes_vconsole(aosbuild: Aosbuild, options: dict[str, Any], vconsole: str) -> None:
    changes = build_ab(aosbuild, [], stage("org.osbuild.keymap", **options))
    assert changes.added == {"etc": Node("dir", 0o755 & ~umask()),
                             "etc/vconsole.conf": Node("file", 0o644 & ~umask(), size=len(vconsole),
                                                       sha256=hashlib.sha256(vconsole.encode()).hexdigest())}
    assert (changes.removed, changes.changed) == ({}, {})
    assert (aosbuild.output / "b" / "etc" / "vconsole.conf").read_text() == vconsole


def test_x11_keymap_writes_xorg_keyboard_conf(aosbuild: Aosbuild) -> None:
    keymap = stage("org.osbuild.keymap", keymap="us", **{"x11-keymap": {"layouts": ["us", "cz"]}})
    changes = build_ab(aosbuild, [], keymap)
    assert set(changes.added) == {"etc", "etc/vconsole.conf", "etc/X11", "etc/X11/xorg.conf.d",
                                  "etc/X11/xorg.conf.d/00-keyboard.conf"}
    conf = aosbuild.output / "b" / "etc" / "X11" / "xorg.conf.d" / "00-keyboard.conf"
    assert conf.read_text() == XORG.format("us,cz")


def test_replaces_vconsole(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.keymap", keymap="fr", font="lat0-16")]
    changes = build_ab(aosbuild, base, stage("org.osbuild.keymap", keymap="us"))
    assert (changes.added, changes.removed) == ({}, {})
    assert set(changes.changed) == {"etc/vconsole.conf"}
    assert (aosbuild.output / "b" / "etc" / "vconsole.conf").read_text() == "KEYMAP=us\n"


def test_invalid_name_fails(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.keymap", keymap="us\nFONT=x"))))
    assert result.returncode == 1
    assert "invalid keymap, layout or font name" in result.stderr


def test_bad_options(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.keymap", font="x"))))
    assert_invalid(result, ".pipelines[0].stages[0].options", "'keymap' is a required property")
    no_layouts: dict[str, Any] = {"x11-keymap": {"layouts": []}}
    empty = aosbuild(manifest(pipeline("p", stage("org.osbuild.keymap", keymap="us", **no_layouts))))
    assert_invalid(empty, ".pipelines[0].stages[0].options.x11-keymap.layouts", "[] should be non-empty")
