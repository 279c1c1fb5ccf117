"""org.osbuild.modprobe: blacklist and install commands in a file in /usr/lib/modprobe.d."""

from __future__ import annotations

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import assert_invalid, build_ab

COMMANDS = [{"command": "blacklist", "modulename": "nouveau"},
            {"command": "install", "modulename": "floppy", "cmdline": "/bin/false"}]


def test_writes_the_file(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, [], stage("org.osbuild.modprobe", filename="local.conf", commands=COMMANDS))
    assert set(changes.added) == {"usr", "usr/lib", "usr/lib/modprobe.d", "usr/lib/modprobe.d/local.conf"}
    assert (changes.removed, changes.changed) == ({}, {})
    text = (aosbuild.output / "b" / "usr/lib/modprobe.d/local.conf").read_text()
    assert text == "blacklist nouveau\ninstall floppy /bin/false\n"


def test_replaces_a_file_of_the_same_name(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.modprobe", filename="local.conf", commands=COMMANDS)]
    changes = build_ab(aosbuild, base, stage("org.osbuild.modprobe", filename="local.conf", commands=COMMANDS[:1]))
    assert list(changes.changed) == ["usr/lib/modprobe.d/local.conf"]
    assert (aosbuild.output / "b" / "usr/lib/modprobe.d/local.conf").read_text() == "blacklist nouveau\n"


def test_a_second_line_fails(aosbuild: Aosbuild) -> None:
    commands = [{"command": "blacklist", "modulename": "a\ninstall b /bin/sh"}]
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.modprobe", filename="a.conf", commands=commands))))
    assert result.returncode == 1
    assert "must be one line each" in result.stderr


def test_filename_outside_modprobe_d_is_invalid(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.modprobe", filename="../../x.conf",
                                                   commands=COMMANDS))))
    assert_invalid(result, ".pipelines[0].stages[0].options.filename", "'../../x.conf' does not match")


def test_bad_options(aosbuild: Aosbuild) -> None:
    install = [{"command": "install", "modulename": "floppy"}]
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.modprobe", filename="a.conf", commands=install))))
    assert_invalid(result, ".pipelines[0].stages[0].options.commands[0]", "{'command': 'install'")
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.modprobe", filename="a.conf"))))
    assert_invalid(result, ".pipelines[0].stages[0].options", "'commands' is a required property")
