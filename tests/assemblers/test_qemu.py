"""The org.osbuild.qemu assembler: a partitioned disk with ext4 (and vfat) file systems and GRUB, in any format.

Each image is checked piece by piece (table, MBR code, core image, file systems read at their offsets)
and booted in QEMU until GRUB's menu, read from the image's grub.cfg, shows on the serial console.
"""

from __future__ import annotations

import lzma
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Aosbuild
from tests.stages.disks import (
    BIOS_BOOT,
    ESP,
    GRUB_DIR,
    LINUX,
    boot_to_grub,
    debugfs,
    e2fsck,
    extract,
    qemu_img_info,
    superblock,
    table,
)

from .v1 import assemble, assert_invalid_v1, run, v1_stage

# the store is a tmpfs mounted nodev, as /dev/shm is on a stock Debian 12: devices must work on it
pytestmark = pytest.mark.usefixtures("nodev_store")

ROOT_UUID = "6e4ff95f-f662-45ee-a82a-bdf44a2d0b75"
BOOT_UUID = "0194fdc2-fa2f-4cc0-81d3-ff12045b73c8"
KERNEL = "6.1.0-10-amd64"
TITLE = f"Debian GNU/Linux, with Linux {KERNEL}"
SIZE = 64 << 20


def tree(**grub: Any) -> list[dict[str, Any]]:
    """A tree with a (fake) kernel, GRUB's configuration and modules, and an ESP's contents."""
    return [v1_stage("org.osbuild.mkdir", paths=[{"path": "/boot/efi/EFI/BOOT", "parents": True},
                                                 {"path": "/etc"}]),
            v1_stage("org.osbuild.hostname", hostname="assembled"),
            v1_stage("org.osbuild.truncate", filename=f"/boot/vmlinuz-{KERNEL}", size="4K"),
            v1_stage("org.osbuild.truncate", filename="/boot/efi/EFI/BOOT/BOOTX64.EFI", size="1K"),
            v1_stage("org.aosbuild.debian.grub2", serial_console="ttyS0,115200", config={"timeout": 60},
                     **{"rootfs": {"uuid": ROOT_UUID}, **grub})]


def boot_code(location: int) -> bytes:
    code = bytearray((GRUB_DIR / "boot.img").read_bytes()[:440])
    code[0x5C:0x64] = struct.pack("<Q", location)
    return bytes(code)


def core_image(workdir: Path, prefix: str, *modules: str) -> bytes:
    out = workdir / "core.img"
    subprocess.run(["grub-mkimage", "-d", str(GRUB_DIR), "-O", "i386-pc", "-C", "auto", "-o", str(out), "-p", prefix,
                    *modules], check=True)
    return out.read_bytes()


def test_legacy_single_partition_raw(aosbuild: Aosbuild) -> None:
    output = assemble(aosbuild, tree(), "org.osbuild.qemu", format="raw", filename="disk.img", size=SIZE,
                      ptuuid="0x14fc63d2", root_fs_uuid=ROOT_UUID)
    assert [p.name for p in output.iterdir()] == ["disk.img"]  # no temporary file left behind
    image = output / "disk.img"
    assert image.stat().st_size == SIZE
    found = table(image)
    assert (found["label"], found["id"]) == ("dos", "0x14fc63d2")
    [part] = found["partitions"]
    assert (part["start"], part["size"], part["type"], part["bootable"]) == (2048, SIZE // 512 - 2048, "83", True)
    data = image.read_bytes()
    core = core_image(aosbuild.workdir, "(,msdos1)/boot/grub", "biosdisk", "part_msdos", "ext2")
    assert data[:440] == boot_code(1)
    assert data[512:512 + len(core)] == core
    root = extract(image, part["start"], part["size"], aosbuild.workdir / "root.img")
    e2fsck(root)
    assert superblock(root)["Filesystem UUID"] == ROOT_UUID
    assert debugfs(root, "cat /etc/hostname") == "assembled\n"
    assert "BOOTX64.EFI" in debugfs(root, "ls /boot/efi/EFI/BOOT")  # no ESP: it stays on the root
    boot_to_grub(image, "raw", TITLE)


@pytest.mark.parametrize(("options", "fmt", "expected"), [
    ({"format": "qcow2", "qcow2_compat": "0.10"}, "qcow2", {"compat": "0.10"}),
    ({"format": "vmdk", "vmdk_subformat": "streamOptimized"}, "vmdk", {"create-type": "streamOptimized"}),
    ({"format": "vpc"}, "vpc", {}),
    ({"format": "vdi"}, "vdi", {}),
    ({"format": "vhdx"}, "vhdx", {}),
], ids=["qcow2-compat", "vmdk", "vpc", "vdi", "vhdx"])
def test_formats(aosbuild: Aosbuild, options: dict[str, Any], fmt: str, expected: dict[str, Any]) -> None:
    output = assemble(aosbuild, tree(), "org.osbuild.qemu", filename=f"disk.{fmt}", size=SIZE, ptuuid="0x14fc63d2",
                      root_fs_uuid=ROOT_UUID, **options)
    assert [p.name for p in output.iterdir()] == [f"disk.{fmt}"]
    info = qemu_img_info(output / f"disk.{fmt}", fmt)
    assert (info["format"], info["virtual-size"]) == (fmt, SIZE)
    specific = info.get("format-specific", {}).get("data", {})
    assert {key: specific.get(key) for key in expected} == expected
    if fmt == "qcow2":
        boot_to_grub(output / f"disk.{fmt}", fmt, TITLE)


def test_raw_xz(aosbuild: Aosbuild) -> None:
    output = assemble(aosbuild, tree(), "org.osbuild.qemu", format="raw.xz", filename="disk.raw.xz", size=SIZE,
                      ptuuid="0x14fc63d2", root_fs_uuid=ROOT_UUID)
    raw = aosbuild.workdir / "disk.raw"
    raw.write_bytes(lzma.decompress((output / "disk.raw.xz").read_bytes()))
    assert raw.stat().st_size == SIZE
    assert [p["start"] for p in table(raw)["partitions"]] == [2048]


def test_gpt_with_bios_boot_and_esp(aosbuild: Aosbuild) -> None:
    partitions = [{"start": 2048, "size": 2048, "type": BIOS_BOOT},
                  {"start": 4096, "size": 32768, "type": ESP, "filesystem": {
                      "type": "vfat", "uuid": "7B77-95E7", "label": "ESP", "mountpoint": "/boot/efi"}},
                  {"start": 36864, "type": LINUX, "uuid": "6264D520-3FB9-423F-8AB8-7A0A8E3D3562", "name": "root",
                   "filesystem": {"type": "ext4", "uuid": ROOT_UUID, "label": "root", "mountpoint": "/"}}]
    output = assemble(aosbuild, tree(), "org.osbuild.qemu", format="raw", filename="disk.img", size=SIZE,
                      ptuuid="D209C89E-EA5E-4FBD-B161-B461CCE297E0", pttype="gpt", partitions=partitions,
                      bootloader={"type": "grub2"})
    image = output / "disk.img"
    found = table(image)
    assert found["label"] == "gpt"
    assert [(p["start"], p["type"], p.get("name", "")) for p in found["partitions"]] == [
        (2048, BIOS_BOOT, ""), (4096, ESP, ""), (36864, LINUX, "root")]
    data = image.read_bytes()
    core = bytearray(core_image(aosbuild.workdir, "(,gpt3)/boot/grub", "biosdisk", "part_gpt", "ext2"))
    core[500:508] = struct.pack("<Q", 2049)
    assert data[:440] == boot_code(2048)
    assert data[2048 * 512:2048 * 512 + len(core)] == core
    root_part = found["partitions"][2]
    root = extract(image, root_part["start"], root_part["size"], aosbuild.workdir / "root.img")
    e2fsck(root)
    assert superblock(root)["Filesystem volume name"] == "root"
    assert debugfs(root, "ls /boot/efi").split()[2::3] == [".", ".."]  # the ESP's mount point, empty
    esp = f"{image}@@{4096 * 512}"
    listing = subprocess.run(["mdir", "-b", "-i", esp, "::/EFI/BOOT"], capture_output=True, text=True, check=True)
    assert listing.stdout.split() == ["::/EFI/BOOT/BOOTX64.EFI"]
    info = subprocess.run(["minfo", "-i", esp, "::"], capture_output=True, text=True, check=True).stdout
    assert "serial number: 7B7795E7" in info
    boot_to_grub(image, "raw", TITLE)


def test_separate_boot_partition(aosbuild: Aosbuild) -> None:
    partitions = [{"size": 32768, "type": "83", "bootable": True, "filesystem": {
                      "type": "ext4", "uuid": BOOT_UUID, "mountpoint": "/boot"}},
                  {"type": "83", "filesystem": {"type": "ext4", "uuid": ROOT_UUID, "mountpoint": "/"}}]
    output = assemble(aosbuild, tree(bootfs={"uuid": BOOT_UUID}), "org.osbuild.qemu", format="raw",
                      filename="disk.img", size=SIZE, ptuuid="0x14fc63d2", pttype="dos", partitions=partitions)
    image = output / "disk.img"
    boot_part, root_part = table(image)["partitions"]
    data = image.read_bytes()
    assert data[512:512 + 64] == core_image(aosbuild.workdir, "(,msdos1)/grub", "biosdisk", "part_msdos",
                                            "ext2")[:64]
    boot = extract(image, boot_part["start"], boot_part["size"], aosbuild.workdir / "boot.img")
    root = extract(image, root_part["start"], root_part["size"], aosbuild.workdir / "root.img")
    e2fsck(boot)
    e2fsck(root)
    assert "grub.cfg" in debugfs(boot, "ls /grub")
    assert "vmlinuz" not in debugfs(root, "ls /boot")  # the kernel is on the boot partition only
    assert f"vmlinuz-{KERNEL}" in debugfs(boot, "ls /")
    boot_to_grub(image, "raw", TITLE)


def test_size_must_be_whole_sectors(aosbuild: Aosbuild) -> None:
    result = run(aosbuild, tree(), "org.osbuild.qemu", format="raw", filename="d", size=SIZE + 1, ptuuid="0x1",
                 root_fs_uuid=ROOT_UUID)
    assert result.returncode == 1
    assert "must be a multiple of the sector size, 512" in result.stderr


def test_gpt_grub_needs_a_bios_boot_partition(aosbuild: Aosbuild) -> None:
    partitions = [{"start": 2048, "filesystem": {"type": "ext4", "uuid": ROOT_UUID, "mountpoint": "/"}}]
    result = run(aosbuild, tree(), "org.osbuild.qemu", format="raw", filename="d", size=SIZE, ptuuid="0x1",
                 pttype="gpt", partitions=partitions, bootloader={"type": "grub2"})
    assert result.returncode == 1
    assert "GRUB on a gpt disk needs a BIOS boot partition" in result.stderr


def test_mount_point_missing_from_the_tree(aosbuild: Aosbuild) -> None:
    partitions = [{"size": 8192, "filesystem": {"type": "ext4", "uuid": BOOT_UUID, "mountpoint": "/srv"}},
                  {"filesystem": {"type": "ext4", "uuid": ROOT_UUID, "mountpoint": "/"}}]
    result = run(aosbuild, tree(), "org.osbuild.qemu", format="raw", filename="d", size=SIZE, ptuuid="0x1",
                 pttype="dos", partitions=partitions)
    assert result.returncode == 1
    assert "the mount point /srv is not a directory in the tree" in result.stderr


@pytest.mark.parametrize(("options", "location", "message"), [
    ({"root_fs_uuid": ROOT_UUID, "pttype": "dos", "partitions": []}, "", "{'format': 'raw'"),
    ({"root_fs_uuid": ROOT_UUID, "root_fs_type": "ntfs"}, ".root_fs_type", "'ntfs' is not one of ['ext4', 'xfs'"),
    ({"root_fs_uuid": ROOT_UUID, "bootloader": {"type": "lilo"}}, ".bootloader.type", "'lilo' is not one of"),
    ({"pttype": "gpt", "partitions": [{"filesystem": {"type": "ntfs", "uuid": "x", "mountpoint": "/"}}]},
     ".partitions[0].filesystem.type", "'ntfs' is not one of ['ext4', 'xfs', 'vfat', 'btrfs']"),
    ({"root_fs_uuid": ROOT_UUID, "qcow2_compression_type": "zstd"}, "",
     "Additional properties are not allowed ('qcow2_compression_type' was unexpected)"),
])
def test_bad_options(aosbuild: Aosbuild, options: dict[str, Any], location: str, message: str) -> None:
    result = run(aosbuild, [], "org.osbuild.qemu", format="raw", filename="d", size=SIZE, ptuuid="0x1", **options)
    assert_invalid_v1(result, location, message)


@pytest.mark.parametrize(("options", "message"), [
    ({"root_fs_type": "xfs"}, "file system 'xfs': aosbuild's bundled org.osbuild.qemu assembler makes ext4"),
    ({"bootloader": {"type": "zipl"}}, "bootloader 'zipl' (s390x): aosbuild's bundled"),
], ids=["xfs", "zipl"])
def test_what_osbuild_takes_but_this_assembler_cannot_do_is_refused(aosbuild: Aosbuild, options: dict[str, Any],
                                                                    message: str) -> None:
    result = run(aosbuild, tree(), "org.osbuild.qemu", format="raw", filename="d", size=SIZE, ptuuid="0x1",
                 root_fs_uuid=ROOT_UUID, **options)
    assert result.returncode == 1
    assert message in result.stderr


def test_the_engine_runs_the_assembler(aosbuild: Aosbuild) -> None:
    result = run(aosbuild, tree(), "org.osbuild.qemu", format="raw", filename="disk.img",
                 size=SIZE, ptuuid="0x14fc63d2", root_fs_uuid=ROOT_UUID)
    assert result.returncode == 0, result.stderr
