"""org.osbuild.fstab: /etc/fstab from any fs_spec, replacing the file."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .treediff import Node, assert_invalid, build_ab, umask

FILESYSTEMS = [
    {"uuid": "9c6ae55b-cf88-45b8-84e8-64990759f39d", "path": "/", "vfs_type": "ext4", "options": "errors=remount-ro",
     "passno": 1},
    {"label": "EFI", "path": "/boot/efi", "vfs_type": "vfat", "options": "umask=0077", "passno": 2},
    {"partlabel": "swap", "path": "none", "vfs_type": "swap", "options": "sw"},
    {"device": "tmpfs", "path": "/tmp", "vfs_type": "tmpfs", "options": "mode=1777,size=50%"},
    {"device": "/dev/vdb1", "path": "/mnt/my data", "freq": 1},
]
TEXT = ("UUID=9c6ae55b-cf88-45b8-84e8-64990759f39d\t/\text4\terrors=remount-ro\t0\t1\n"
        "LABEL=EFI\t/boot/efi\tvfat\tumask=0077\t0\t2\n"
        "PARTLABEL=swap\tnone\tswap\tsw\t0\t0\n"
        "tmpfs\t/tmp\ttmpfs\tmode=1777,size=50%\t0\t0\n"
        "/dev/vdb1\t/mnt/my\\040data\tnone\tdefaults\t1\t0\n")


def test_writes_etc_fstab(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, [], stage("org.osbuild.fstab", filesystems=FILESYSTEMS))
    assert changes.added.keys() == {"etc", "etc/fstab"}
    assert changes.added["etc/fstab"].mode == 0o644 & ~umask()
    assert (aosbuild.output / "b" / "etc" / "fstab").read_text() == TEXT


def test_replaces_existing_entries(aosbuild: Aosbuild) -> None:
    base = [stage("org.osbuild.fstab", filesystems=FILESYSTEMS)]
    changes = build_ab(aosbuild, base, stage("org.osbuild.fstab", filesystems=FILESYSTEMS[3:4]))
    assert (changes.added, changes.removed, list(changes.changed)) == ({}, {}, ["etc/fstab"])
    assert (aosbuild.output / "b" / "etc" / "fstab").read_text() == "tmpfs\t/tmp\ttmpfs\tmode=1777,size=50%\t0\t0\n"


def test_no_filesystems_empties_the_file(aosbuild: Aosbuild) -> None:
    changes = build_ab(aosbuild, [], stage("org.osbuild.fstab", filesystems=[]))
    assert changes.added["etc/fstab"] == Node("file", 0o644 & ~umask(), size=0,
                                              sha256="e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


@pytest.mark.parametrize(("item", "message"), [
    ({"path": "/"}, "{'path': '/'} is not valid under any of the given schemas"),
    ({"uuid": "x", "label": "y", "path": "/"}, "{'uuid': 'x', 'label': 'y', 'path': '/'} is valid under each of"),
    ({"device": "/dev/sda1"}, "{'device': '/dev/sda1'} is not valid under any of the given schemas"),
])
def test_bad_filesystems(aosbuild: Aosbuild, item: dict[str, Any], message: str) -> None:
    result = aosbuild(manifest(pipeline("p", stage("org.osbuild.fstab", filesystems=[item]))))
    assert_invalid(result, ".pipelines[0].stages[0].options.filesystems[0]", message)


def test_takes_exactly_osbuilds_options(aosbuild: Aosbuild) -> None:
    """`partuuid` was aosbuild's addition: org.osbuild.fstab takes osbuild's options, no more."""
    result = aosbuild(manifest(pipeline("os", stage("org.osbuild.fstab", filesystems=[
        {"partuuid": "6a1d2e5c-01", "path": "/srv"}]))))
    assert_invalid(result, ".pipelines[0].stages[0].options.filesystems[0]",
                   "{'partuuid': '6a1d2e5c-01', 'path': '/srv'} is not valid under any of the given schemas")


def test_ostree_option_is_refused_when_run(aosbuild: Aosbuild) -> None:
    """osbuild's schema takes `ostree`; this stage has no ostree deployments to write into and says so."""
    result = aosbuild(manifest(pipeline("os", stage("org.osbuild.fstab", filesystems=FILESYSTEMS[:1],
                                                    ostree={"deployment": {"default": True}}))))
    assert result.returncode == 1, result.stderr
    assert "does not write into ostree deployments" in result.stderr
