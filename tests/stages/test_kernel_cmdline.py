"""org.osbuild.kernel-cmdline: root=UUID= and the options in /etc/kernel/cmdline, without a newline."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import assert_invalid, build_ab

UUID = "9c6ae55b-cf88-45b8-84e8-64990759f39d"


@pytest.mark.parametrize(("options", "cmdline"), [
    ({"root_fs_uuid": UUID, "kernel_opts": "ro console=ttyS0,115200"}, f"root=UUID={UUID} ro console=ttyS0,115200"),
    ({"root_fs_uuid": "6699-AFB5"}, "root=UUID=6699-AFB5"),
    ({"kernel_opts": "quiet"}, "quiet"),
    ({}, ""),
])
def test_writes_etc_kernel_cmdline(aosbuild: Aosbuild, options: dict[str, Any], cmdline: str) -> None:
    changes = build_ab(aosbuild, [], stage("org.osbuild.kernel-cmdline", **options))
    assert set(changes.added) == {"etc", "etc/kernel", "etc/kernel/cmdline"}
    assert (aosbuild.output / "b" / "etc" / "kernel" / "cmdline").read_text() == cmdline


def test_replaces_an_earlier_command_line(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.kernel-cmdline", kernel_opts="a much longer command line")]
    changes = build_ab(aosbuild, base, stage("org.osbuild.kernel-cmdline", kernel_opts="short"))
    assert (changes.added, changes.removed, list(changes.changed)) == ({}, {}, ["etc/kernel/cmdline"])
    assert (aosbuild.output / "b" / "etc" / "kernel" / "cmdline").read_text() == "short"


def test_two_lines_fail(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.kernel-cmdline", kernel_opts="ro\ninit=/x"))))
    assert result.returncode == 1
    assert "must be one line" in result.stderr


def test_bad_options(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.kernel-cmdline", root_fs_uuid="not-a-uuid"))))
    assert_invalid(result, ".pipelines[0].stages[0].options.root_fs_uuid", "'not-a-uuid' is not valid")
    extra = aosbuild(manifest(pipeline("p", stage("org.osbuild.kernel-cmdline", kernel="x"))))
    assert_invalid(extra, ".pipelines[0].stages[0].options", "Additional properties are not allowed")


def test_longer_than_the_kernel_takes_fails(aosbuild: Aosbuild) -> None:
    """osbuild's `kernel_cmdline_size`: the limit, by default the kernel's for the architecture (2048 on x86_64)."""
    ok = aosbuild(manifest(pipeline("p", stage("org.osbuild.kernel-cmdline", kernel_opts="x" * 2048))))
    assert ok.returncode == 0, ok.stderr
    too_long = aosbuild(manifest(pipeline("p", stage("org.osbuild.kernel-cmdline", kernel_opts="x" * 300,
                                                     kernel_cmdline_size=256))))
    assert too_long.returncode == 1
    assert "the kernel command line is 300 characters, more than the kernel takes (256)" in too_long.stderr
