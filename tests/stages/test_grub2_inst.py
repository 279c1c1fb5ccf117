"""org.osbuild.grub2.inst: GRUB's boot.img code in the MBR and a core image in the MBR gap or BIOS boot partition."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .disks import BIOS_BOOT, GRUB_DIR, LINUX, on_device, table
from .treediff import assert_invalid, export

# the store is a tmpfs mounted nodev, as /dev/shm is on a stock Debian 12: devices must work on it
pytestmark = pytest.mark.usefixtures("nodev_store")

CORE = {"type": "mkimage", "partlabel": "dos", "filesystem": "ext4"}
PREFIX = {"type": "partition", "partlabel": "dos", "number": 0, "path": "/boot/grub"}
DOS = [{"start": 2048, "type": "83", "bootable": True}]
# partition UUIDs given: the table must come out the same in both builds
GPT = [{"start": 2048, "size": 2048, "type": BIOS_BOOT, "uuid": "FAC7F1FB-3E8D-4137-A512-961DE09A5549"},
       {"start": 4096, "type": LINUX, "uuid": "6264D520-3FB9-423F-8AB8-7A0A8E3D3562"}]


def install(**options: Any) -> dict[str, Any]:
    return stage("org.osbuild.grub2.inst", **{"filename": "disk.img", "platform": "i386-pc", **options})


def disk(label: str, partitions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [stage("org.osbuild.truncate", filename="disk.img", size="64M"),
            on_device("org.osbuild.sfdisk", label=label, uuid="0x14fc63d2" if label == "dos" else
                      "D209C89E-EA5E-4FBD-B161-B461CCE297E0", partitions=partitions)]


def build(aosbuild: Aosbuild, *stages: dict[str, Any]) -> tuple[bytes, bytes]:
    """The image before and after the last stage."""
    before, after = pipeline("before", *stages[:-1]), pipeline("after", *stages)
    result = export(aosbuild, manifest(before, after), "before", "after")
    assert result.returncode == 0, result.stderr
    return ((aosbuild.output / "before" / "disk.img").read_bytes(),
            (aosbuild.output / "after" / "disk.img").read_bytes())


def core_image(workdir: Path, prefix: str, *modules: str, image_format: str = "i386-pc") -> bytes:
    """The core image the host's grub-mkimage makes (it is reproducible)."""
    out = workdir / "core.img"
    subprocess.run(["grub-mkimage", "-d", str(GRUB_DIR), "-O", image_format, "-C", "auto", "-o", str(out), "-p",
                    prefix, *modules], check=True)
    return out.read_bytes()


def boot_code(location: int) -> bytes:
    code = bytearray((GRUB_DIR / "boot.img").read_bytes()[:440])
    code[0x5C:0x64] = struct.pack("<Q", location)
    return bytes(code)


def changed_sectors(before: bytes, after: bytes) -> list[int]:
    return [i // 512 for i in range(0, len(before), 512) if before[i:i + 512] != after[i:i + 512]]


def test_dos_mbr_gap(aosbuild: Aosbuild) -> None:
    before, after = build(aosbuild, *disk("dos", DOS), install(core=CORE, prefix=PREFIX, location=1))
    core = core_image(aosbuild.workdir, "(,msdos1)/boot/grub", "biosdisk", "part_msdos", "ext2")
    assert after[:440] == boot_code(1)
    assert after[440:512] == before[440:512]  # disk signature, partition table, 0x55aa
    assert after[512:512 + len(core)] == core
    assert changed_sectors(before, after) == list(range(0, 1 + -(-len(core) // 512)))
    assert [p["start"] for p in table(aosbuild.output / "after" / "disk.img")["partitions"]] == [2048]


def test_gpt_bios_boot_partition(aosbuild: Aosbuild) -> None:
    core_options = {**CORE, "partlabel": "gpt", "binary": "grub-mkimage"}
    prefix = {**PREFIX, "partlabel": "gpt", "number": 1}
    before, after = build(aosbuild, *disk("gpt", GPT), install(core=core_options, prefix=prefix, location=2048))
    core = bytearray(core_image(aosbuild.workdir, "(,gpt2)/boot/grub", "biosdisk", "part_gpt", "ext2"))
    core[500:508] = struct.pack("<Q", 2049)  # the rest of the core follows its first sector, at 2049
    assert after[:440] == boot_code(2048)
    assert after[440:512] == before[440:512]  # the protective MBR's entry
    assert after[2048 * 512:2048 * 512 + len(core)] == core
    assert changed_sectors(before, after) == [0, *range(2048, 2048 + -(-len(core) // 512))]


@pytest.mark.parametrize("location", [{}, {"location": 0}])
def test_without_location_the_core_image_is_the_file(aosbuild: Aosbuild, location: dict[str, int]) -> None:
    """As osbuild's stage: no location (or 0) copies the core image to the file, whatever it held."""
    _, after = build(aosbuild, *disk("dos", DOS), install(core=CORE, prefix=PREFIX, **location))
    assert after == core_image(aosbuild.workdir, "(,msdos1)/boot/grub", "biosdisk", "part_msdos", "ext2")


def test_path_prefix_and_el_torito(aosbuild: Aosbuild) -> None:
    """An iso9660 core is GRUB's El Torito image (osbuild's `i386-pc-eltorito`), as an ISO boots it."""
    core_options = {**CORE, "filesystem": "iso9660"}
    _, after = build(aosbuild, stage("org.osbuild.truncate", filename="disk.img", size="0"),
                     install(core=core_options, prefix={"path": "/boot/grub2"}))
    assert after == core_image(aosbuild.workdir, "/boot/grub2", "biosdisk", "part_msdos", "iso9660",
                               image_format="i386-pc-eltorito")


@pytest.mark.parametrize(("label", "partitions", "options", "message"), [
    ("gpt", [{"start": 2048, "type": LINUX}], {"location": 1}, "would overwrite the GPT header"),
    ("dos", [{"start": 34, "type": "83"}], {"location": 1}, "would overwrite partition"),
    ("gpt", GPT, {"location": 4200}, "would overwrite partition"),
    # osbuild's schema takes this; the bundled stage refuses it when it runs
    ("dos", DOS, {"platform": "powerpc-ieee1275"}, "platform 'powerpc-ieee1275': aosbuild's bundled"),
])
def test_refuses_to_overwrite(aosbuild: Aosbuild, label: str, partitions: list[dict[str, Any]],
                              options: dict[str, Any], message: str) -> None:
    result = aosbuild(manifest(pipeline("p", *disk(label, partitions), install(core=CORE, prefix=PREFIX, **options))))
    assert result.returncode == 1, result.stderr
    assert message in result.stderr


@pytest.mark.parametrize(("options", "location", "message"), [
    ({"core": CORE}, "", "'prefix' is a required property"),
    ({"core": {**CORE, "filesystem": "vfat"}, "prefix": PREFIX}, ".core", "{'type': 'mkimage'"),
    ({"core": CORE, "prefix": {**PREFIX, "number": "1"}}, ".prefix", "{'type': 'partition'"),
])
def test_bad_options(aosbuild: Aosbuild, options: dict[str, Any], location: str, message: str) -> None:
    result = aosbuild(manifest(pipeline("p", install(**options))))
    assert_invalid(result, ".pipelines[0].stages[0].options" + location, message)
