"""org.osbuild.mkfs.fat: FAT on a partition through a loop device at its offset; read with fsck.fat and mtools."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .disks import extract, loopback, on_device
from .treediff import assert_invalid, export

# the store is a tmpfs mounted nodev, as /dev/shm is on a stock Debian 12: devices must work on it
pytestmark = pytest.mark.usefixtures("nodev_store")

START, SIZE = 2048, 65536  # a 32 MiB partition from 1 MiB on


def formatted(aosbuild: Aosbuild, **options: Any) -> Path:
    description = manifest(pipeline(
        "image", stage("org.osbuild.truncate", filename="disk.img", size="64M"),
        on_device("org.osbuild.sfdisk", label="dos", uuid="0x00000001",
                  partitions=[{"start": START, "size": SIZE, "type": "ef"}, {}]),
        on_device("org.osbuild.mkfs.fat", loopback(start=START, size=SIZE), **options)))
    result = export(aosbuild, description, "image")
    assert result.returncode == 0, result.stderr
    return aosbuild.output / "image" / "disk.img"


def minfo(image: Path) -> dict[str, str]:
    """What mtools reads from the boot sector at the partition's offset: `key: value` and `key="value"` lines."""
    out = subprocess.run(["minfo", "-i", f"{image}@@{START * 512}", "::"], capture_output=True, text=True,
                         check=True).stdout
    return {m["key"]: m["value"].strip() for m in re.finditer(r'^(?P<key>[a-z ]+)[:=]"?(?P<value>[^"\n]*)', out, re.M)}


def fsck(image: Path, workdir: Path) -> None:
    check = subprocess.run(["fsck.fat", "-n", str(extract(image, START, SIZE, workdir / "part.img"))],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_on_a_partition(aosbuild: Aosbuild) -> None:
    image = formatted(aosbuild, volid="7B7795E7", label="ESP")
    fsck(image, aosbuild.workdir)
    info = minfo(image)
    assert (info["serial number"], info["disk label"], info["disk type"]) == ("7B7795E7", "ESP", "FAT16")
    assert info["big size"] == f"{SIZE} sectors"  # exactly the partition
    data = image.read_bytes()
    assert data[SIZE * 512 + START * 512:] == bytes(len(data) - (START + SIZE) * 512)  # nothing after it


def test_fat_size_label_and_geometry(aosbuild: Aosbuild) -> None:
    # osbuild drops the label when fat-size is given; both are kept here
    image = formatted(aosbuild, volid="0000abcd", label="BOOT", **{"fat-size": 32},
                      geometry={"heads": 16, "sectors-per-track": 63})
    fsck(image, aosbuild.workdir)
    info = minfo(image)
    assert (info["serial number"], info["disk label"], info["disk type"]) == ("0000ABCD", "BOOT", "FAT32")
    assert (info["heads"], info["sectors per track"]) == ("16", "63")


def test_files_go_in_with_mtools(aosbuild: Aosbuild) -> None:
    image = formatted(aosbuild, volid="12345678")
    src = aosbuild.workdir / "hello.txt"
    src.write_text("hello fat\n")
    subprocess.run(["mcopy", "-i", f"{image}@@{START * 512}", str(src), "::/hello.txt"], check=True)
    fsck(image, aosbuild.workdir)
    out = subprocess.run(["mtype", "-i", f"{image}@@{START * 512}", "::/hello.txt"], capture_output=True,
                         text=True, check=True).stdout
    assert out == "hello fat\n"


@pytest.mark.parametrize(("options", "location", "message"), [
    ({"label": "ESP"}, "", "'volid' is a required property"),
    ({"volid": "1", "label": "TWELVE CHARS"}, ".label", "'TWELVE CHARS' is too long"),
    ({"volid": "1", "fat-size": 64}, ".fat-size", "64 is not one of [12, 16, 32]"),
    ({"volid": "1", "geometry": {"heads": 16}}, ".geometry", "'sectors-per-track' is a required property"),
])
def test_bad_options(aosbuild: Aosbuild, options: dict[str, Any], location: str, message: str) -> None:
    result = aosbuild(manifest(pipeline("image", on_device("org.osbuild.mkfs.fat", **options))))
    assert_invalid(result, ".pipelines[0].stages[0].options" + location, message)


def test_without_a_device_says_what_to_add(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("image", stage("org.osbuild.mkfs.fat", volid="1"))))
    assert result.returncode == 1
    assert "add an org.osbuild.loopback device 'device'" in result.stderr
