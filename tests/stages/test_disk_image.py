"""The disk stages together: a partitioned, GRUB-bootable image, through loop devices and without them.

truncate → sfdisk → mkfs.ext4 + copy through an ext4 mount (or mkfs.ext4.tree, loop-free) and mkfs.fat
→ grub2.inst → qemu. The result is checked piece by piece, then booted in QEMU until GRUB's menu, read
from grub.cfg on the ext4 partition through the modules in /boot/grub/i386-pc, shows on the serial console.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .disks import (
    GRUB_DIR,
    boot_to_grub,
    debugfs,
    e2fsck,
    extract,
    loopback,
    on_device,
    qemu_img_info,
    table,
    tree_input,
)
from .treediff import export

# the store is a tmpfs mounted nodev, as /dev/shm is on a stock Debian 12: devices must work on it
pytestmark = pytest.mark.usefixtures("nodev_store")

UUID = "6e4ff95f-f662-45ee-a82a-bdf44a2d0b75"
ROOT, ROOT_SIZE = 2048, 65536  # 32 MiB
ESP, ESP_SIZE = 67584, 63488  # the rest of the 64 MiB disk, minus the backup GPT's space
KERNEL = "6.1.0-10-amd64"
TITLE = f"Debian GNU/Linux, with Linux {KERNEL}"

TREE = pipeline("tree",
                stage("org.osbuild.mkdir", paths=[{"path": "/boot"}, {"path": "/etc"}, {"path": "/boot/efi"}]),
                stage("org.osbuild.hostname", hostname="disk-test"),
                stage("org.osbuild.truncate", filename=f"/boot/vmlinuz-{KERNEL}", size="4K"),
                stage("org.aosbuild.debian.grub2", rootfs={"uuid": UUID}, serial_console="ttyS0,115200",
                      config={"timeout": 60}))


def image(loop_free: bool) -> dict[str, Any]:
    root = loopback(start=ROOT, size=ROOT_SIZE)
    if loop_free:
        filesystem = [{**stage("org.aosbuild.mkfs.ext4.tree", filename="disk.img", uuid=UUID, label="root",
                               start=ROOT, size=ROOT_SIZE), "inputs": {"tree": tree_input("tree")}}]
    else:
        filesystem = [on_device("org.osbuild.mkfs.ext4", root, uuid=UUID, label="root"),
                      {"type": "org.osbuild.copy", "inputs": {"tree": tree_input("tree")}, "devices": {"root": root},
                       "mounts": [{"name": "root", "type": "org.osbuild.ext4", "source": "root", "target": "/"}],
                       "options": {"paths": [{"from": "input://tree/", "to": "mount://root/"}]}}]
    return pipeline(
        "image",
        stage("org.osbuild.truncate", filename="disk.img", size="64M"),
        on_device("org.osbuild.sfdisk", label="dos", uuid="0x14fc63d2", partitions=[
            {"start": ROOT, "size": ROOT_SIZE, "type": "83", "bootable": True},
            {"start": ESP, "size": ESP_SIZE, "type": "ef"}]),
        *filesystem,
        on_device("org.osbuild.mkfs.fat", loopback(start=ESP, size=ESP_SIZE), volid="7B7795E7", label="ESP"),
        stage("org.osbuild.grub2.inst", filename="disk.img", platform="i386-pc", location=1,
              core={"type": "mkimage", "partlabel": "dos", "filesystem": "ext4"},
              prefix={"type": "partition", "partlabel": "dos", "number": 0, "path": "/boot/grub"}))


QCOW2 = pipeline("qcow2", {**stage("org.aosbuild.qemu", filename="disk.qcow2",
                                   format={"type": "qcow2", "compression_type": "zstd"}),
                           "inputs": {"image": {"type": "org.osbuild.files", "origin": "org.osbuild.pipeline",
                                                "references": {"name:image": {"file": "disk.img"}}}}})


def check_raw(raw: Path, workdir: Path) -> None:
    found = table(raw)
    assert [(p["start"], p["size"], p["type"], p.get("bootable", False)) for p in found["partitions"]] == [
        (ROOT, ROOT_SIZE, "83", True), (ESP, ESP_SIZE, "ef", False)]
    data = raw.read_bytes()
    boot = GRUB_DIR.joinpath("boot.img").read_bytes()
    assert data[:0x5C] == boot[:0x5C]
    assert data[0x5C:0x64] == struct.pack("<Q", 1)  # the core is at sector 1
    assert data[0x64:440] == boot[0x64:440]
    assert data[440:444] == struct.pack("<I", 0x14FC63D2)  # the disk signature survived
    assert data[512:516] == GRUB_DIR.joinpath("diskboot.img").read_bytes()[:4]  # the core starts with diskboot
    root = extract(raw, ROOT, ROOT_SIZE, workdir / "root.img")
    e2fsck(root)
    assert debugfs(root, "cat /etc/hostname") == "disk-test\n"
    assert f"linux /boot/vmlinuz-{KERNEL} root=UUID={UUID} ro" in debugfs(root, "cat /boot/grub/grub.cfg")
    assert "normal.mod" in debugfs(root, "ls /boot/grub/i386-pc")


@pytest.mark.parametrize("loop_free", [False, True], ids=["loop-devices", "loop-free"])
def test_bootable_disk(aosbuild: Aosbuild, loop_free: bool) -> None:
    result = export(aosbuild, manifest(TREE, image(loop_free), QCOW2), "image", "qcow2")
    assert result.returncode == 0, result.stderr
    raw = aosbuild.output / "image" / "disk.img"
    check_raw(raw, aosbuild.workdir)
    qcow2 = aosbuild.output / "qcow2" / "disk.qcow2"
    info = qemu_img_info(qcow2)
    assert (info["format"], info["virtual-size"]) == ("qcow2", 64 << 20)
    assert info["format-specific"]["data"]["compression-type"] == "zstd"
    console = boot_to_grub(qcow2, "qcow2", TITLE)
    assert "error" not in console.lower()
