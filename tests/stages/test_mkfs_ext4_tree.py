"""org.aosbuild.mkfs.ext4.tree: an ext4 file system made from a tree at a partition's offset, without a loop device."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .disks import debugfs, e2fsck, extract, on_device, superblock, tree_input
from .treediff import assert_invalid, assert_refused, export, umask

# the store is a tmpfs mounted nodev, as /dev/shm is on a stock Debian 12: devices must work on it
pytestmark = pytest.mark.usefixtures("nodev_store")

UUID = "6e4ff95f-f662-45ee-a82a-bdf44a2d0b75"
START, SIZE = 2048, 63488  # 31 MiB from 1 MiB on, in a 32 MiB disk
# /etc/hostname (0600), a hard link to it, a symlink, /var (0700), a sparse /var/disk
SRC = pipeline("src",
               stage("org.osbuild.hostname", hostname="example"),
               stage("org.osbuild.chmod", items={"/etc/hostname": {"mode": "0600"}}),
               stage("org.osbuild.ln", paths=[{"target": "/etc/hostname", "link_name": "tree:///etc/hard"},
                                              {"target": "hostname", "link_name": "tree:///etc/soft",
                                               "symbolic": True}]),
               stage("org.osbuild.mkdir", paths=[{"path": "/var", "mode": 0o700}]),
               stage("org.osbuild.truncate", filename="/var/disk", size="1M"))


def mkfs(**options: Any) -> dict[str, Any]:
    return {**stage("org.aosbuild.mkfs.ext4.tree", **options), "inputs": {"tree": tree_input("src")}}


def build(aosbuild: Aosbuild, *stages: dict[str, Any]) -> Path:
    result = export(aosbuild, manifest(SRC, pipeline("image", *stages)), "image")
    assert result.returncode == 0, result.stderr
    return aosbuild.output / "image" / "disk.img"


def partitioned(**options: Any) -> list[dict[str, Any]]:
    return [stage("org.osbuild.truncate", filename="disk.img", size="32M"),
            on_device("org.osbuild.sfdisk", label="dos", uuid="0x00000001",
                      partitions=[{"start": START, "size": SIZE, "type": "83", "bootable": True}]),
            mkfs(filename="disk.img", uuid=UUID, start=START, size=SIZE, **options)]


def test_fills_a_partition_with_the_tree(aosbuild: Aosbuild) -> None:
    image = build(aosbuild, *partitioned(label="root"))
    part = extract(image, START, SIZE, aosbuild.workdir / "part.img")
    e2fsck(part)
    sb = superblock(part)
    assert (sb["Filesystem UUID"], sb["Filesystem volume name"], sb["Block count"]) == (UUID, "root", str(SIZE // 2))
    assert debugfs(part, "cat /etc/hostname") == "example\n"
    assert 'Fast link dest: "hostname"' in debugfs(part, "stat /etc/soft")
    listing = {line.split()[-1]: line.split() for line in debugfs(part, "ls -l /etc").splitlines() if line.strip()}
    assert listing["hostname"][0] == listing["hard"][0]  # one inode
    assert listing["hostname"][1] == "100600"
    assert listing["soft"][1] == "120777"
    var = {line.split()[-1]: line.split() for line in debugfs(part, "ls -l /").splitlines() if line.strip()}["var"]
    assert var[1] == "40700"
    assert "Size: 1048576" in debugfs(part, "stat /var/disk")
    root = debugfs(part, "stat /")
    assert f"Mode:  {0o777 & ~umask():04o}" in root  # the tree root's mode, as `cp -a` would give it
    assert f"User: {os.getuid():>5}" in root
    # the table before the partition is intact, and nothing was written after it
    data = image.read_bytes()
    assert data[510:512] == b"\x55\xaa"
    assert data[(START + SIZE) * 512:] == bytes(len(data) - (START + SIZE) * 512)


def test_whole_file_and_a_missing_file(aosbuild: Aosbuild) -> None:
    image = build(aosbuild, stage("org.osbuild.truncate", filename="disk.img", size="8M"),
                  mkfs(filename="disk.img", uuid=UUID),  # to the end of the file
                  mkfs(filename="new.img", uuid=UUID, size=8192, lazy_init=False, inode_size=256))
    e2fsck(image)
    assert superblock(image)["Block count"] == "8192"
    new = image.parent / "new.img"
    e2fsck(new)
    sb = superblock(new)
    assert (sb["Block count"], sb["Inode size"], new.stat().st_size) == ("4096", "256", 4 << 20)
    assert debugfs(new, "cat /etc/hostname") == "example\n"


def test_tree_too_big_for_the_size_fails(aosbuild: Aosbuild) -> None:
    # a 2 MiB file system has 256 inodes
    src = pipeline("src", stage("org.osbuild.mkdir", paths=[{"path": f"/d{i}"} for i in range(300)]))
    result = aosbuild(manifest(src, pipeline("image", stage("org.osbuild.truncate", filename="disk.img", size="2M"),
                                             mkfs(filename="disk.img", uuid=UUID))))
    assert result.returncode == 1
    assert "mkfs.ext4" in result.stderr
    assert "Could not allocate inode" in result.stderr


def test_missing_file_without_size_says_what_to_do(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(SRC, pipeline("image", mkfs(filename="disk.img", uuid=UUID))))
    assert result.returncode == 1
    assert "make it first (org.osbuild.truncate) or give `size`" in result.stderr


@pytest.mark.parametrize("filename", ["../../escaped.img", "/a/../../escaped.img"])
def test_escape_is_refused(aosbuild: Aosbuild, filename: str) -> None:
    result = export(aosbuild, manifest(SRC, pipeline("image", mkfs(filename=filename, uuid=UUID, size=4096))),
                    "image")
    assert_refused(aosbuild, result, "escaped.img")


@pytest.mark.parametrize(("options", "location", "message"), [
    ({"filename": "disk.img"}, "", "'uuid' is a required property"),
    ({"filename": "disk.img", "uuid": UUID, "start": -1}, ".start", "-1 is less than the minimum of 0"),
    ({"filename": "disk.img", "uuid": UUID, "label": "a-label-of-17-chr"}, ".label", "'a-label-of-17-chr' is too long"),
    ({"filename": "disk.img", "uuid": UUID, "offset": 1}, "", "Additional properties are not allowed"),
])
def test_bad_options(aosbuild: Aosbuild, options: dict[str, Any], location: str, message: str) -> None:
    result = aosbuild(manifest(SRC, pipeline("image", mkfs(**options))))
    assert_invalid(result, ".pipelines[1].stages[0].options" + location, message)
