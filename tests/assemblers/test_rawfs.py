"""The org.osbuild.rawfs assembler: the tree as an ext4 file system image, made without a loop device."""

from __future__ import annotations

import pytest

from tests.conftest import Aosbuild
from tests.stages.disks import debugfs, e2fsck, superblock

from .v1 import assemble, assert_invalid_v1, run, v1_stage

# the store is a tmpfs mounted nodev, as /dev/shm is on a stock Debian 12: devices must work on it
pytestmark = pytest.mark.usefixtures("nodev_store")

UUID = "9c6ae55b-cf88-45b8-84e8-64990759f39d"
STAGES = [v1_stage("org.osbuild.hostname", hostname="example"),
          v1_stage("org.osbuild.mkdir", paths=[{"path": "/var", "mode": 0o700}]),
          v1_stage("org.osbuild.truncate", filename="/var/disk", size="1M")]


def test_filesystem_of_the_tree(aosbuild: Aosbuild) -> None:
    output = assemble(aosbuild, STAGES, "org.osbuild.rawfs", filename="root.ext4", root_fs_uuid=UUID, size=32 << 20)
    image = output / "root.ext4"
    assert [p.name for p in output.iterdir()] == ["root.ext4"]
    st = image.stat()
    assert st.st_size == 32 << 20
    assert st.st_blocks * 512 < 8 << 20  # sparse
    e2fsck(image)
    assert superblock(image)["Filesystem UUID"] == UUID
    assert debugfs(image, "cat /etc/hostname") == "example\n"
    assert "40700" in next(line for line in debugfs(image, "ls -l /").splitlines() if line.endswith(" var"))


def test_tree_larger_than_size_fails(aosbuild: Aosbuild) -> None:
    many = [v1_stage("org.osbuild.mkdir", paths=[{"path": f"/d{i}"} for i in range(300)])]  # 2 MiB: 256 inodes
    result = run(aosbuild, many, "org.osbuild.rawfs", filename="root.ext4", root_fs_uuid=UUID, size=2 << 20)
    assert result.returncode == 1
    assert "Could not allocate inode" in result.stderr


def test_bad_options(aosbuild: Aosbuild) -> None:
    result = run(aosbuild, [], "org.osbuild.rawfs", filename="r", root_fs_uuid="x", size=1 << 20)
    assert_invalid_v1(result, ".root_fs_uuid", "'x' does not match")
    result = run(aosbuild, [], "org.osbuild.rawfs", filename="r", root_fs_uuid=UUID, size=1 << 20, fs_type="ntfs")
    assert_invalid_v1(result, ".fs_type", "'ntfs' is not one of ['ext4', 'xfs', 'btrfs']")


def test_file_systems_osbuild_makes_but_this_assembler_does_not_are_refused(aosbuild: Aosbuild) -> None:
    """osbuild's schema takes xfs and btrfs; this assembler makes ext4 only, and says so when it runs."""
    result = run(aosbuild, [], "org.osbuild.rawfs", filename="r", root_fs_uuid=UUID, size=1 << 20, fs_type="xfs")
    assert result.returncode == 1
    assert "fs_type 'xfs': aosbuild's bundled org.osbuild.rawfs makes ext4 only" in result.stderr
