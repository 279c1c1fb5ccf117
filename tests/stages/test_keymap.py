"""org.osbuild.keymap: /etc/vconsole.conf as systemd-firstboot writes it, /etc/default/keyboard for Debian."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import Node, assert_invalid, build_ab, umask


def keyboard(layout: str, model: str = "pc105", variant: str = "",
             options: str = "terminate:ctrl_alt_bksp") -> str:
    return ("# KEYBOARD CONFIGURATION FILE\n\n# Consult the keyboard(5) manual page.\n\n"
            f'XKBMODEL="{model}"\nXKBLAYOUT="{layout}"\nXKBVARIANT="{variant}"\nXKBOPTIONS="{options}"\n\n'
            'BACKSPACE="guess"\n')


@pytest.mark.parametrize(("options", "vconsole", "default_keyboard"), [
    ({"keymap": "de-latin1"}, "KEYMAP=de-latin1\n", keyboard("de")),
    ({"keymap": "de-latin1-nodeadkeys", "font": "eurlatgr"}, "KEYMAP=de-latin1-nodeadkeys\nFONT=eurlatgr\n",
     keyboard("de", variant="nodeadkeys")),
    ({"keymap": "us", "x11-keymap": {"layouts": ["us", "cz"]}}, "KEYMAP=us\n",
     keyboard("us,cz", model="pc105+inet")),
    ({"keymap": "not-in-the-map"}, "KEYMAP=not-in-the-map\n", keyboard("not-in-the-map", options="")),
])
def test_writes_vconsole_and_default_keyboard(aosbuild: Aosbuild, options: dict[str, Any], vconsole: str,
                                              default_keyboard: str) -> None:
    changes = build_ab(aosbuild, [], stage("org.osbuild.keymap", **options))
    directory = Node("dir", 0o755 & ~umask())
    assert {path: node.kind for path, node in changes.added.items()} == {
        "etc": "dir", "etc/default": "dir", "etc/vconsole.conf": "file", "etc/default/keyboard": "file"}
    assert changes.added["etc"] == changes.added["etc/default"] == directory
    assert changes.added["etc/vconsole.conf"].mode == 0o644 & ~umask()
    assert (changes.removed, changes.changed) == ({}, {})
    etc = aosbuild.output / "b" / "etc"
    assert (etc / "vconsole.conf").read_text() == vconsole
    assert (etc / "default" / "keyboard").read_text() == default_keyboard


def test_replaces_both_files(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.keymap", keymap="fr", font="lat0-16")]
    changes = build_ab(aosbuild, base, stage("org.osbuild.keymap", keymap="us"))
    assert (changes.added, changes.removed) == ({}, {})
    assert set(changes.changed) == {"etc/vconsole.conf", "etc/default/keyboard"}
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
