"""org.osbuild.sfdisk: dos and gpt tables written through a loop device, read back with `sfdisk --json`."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .disks import BIOS_BOOT, ESP, LINUX, loopback, on_device, table
from .treediff import assert_invalid, export

# the store is a tmpfs mounted nodev, as /dev/shm is on a stock Debian 12: devices must work on it
pytestmark = pytest.mark.usefixtures("nodev_store")


def partitioned(aosbuild: Aosbuild, **options: Any) -> dict[str, Any]:
    description = manifest(pipeline("image", stage("org.osbuild.truncate", filename="disk.img", size="64M"),
                                    on_device("org.osbuild.sfdisk", **options)))
    result = export(aosbuild, description, "image")
    assert result.returncode == 0, result.stderr
    return table(aosbuild.output / "image" / "disk.img")


def test_dos(aosbuild: Aosbuild) -> None:
    found = partitioned(aosbuild, label="dos", uuid="0x14fc63d2", partitions=[
        {"start": 2048, "size": 65536, "type": "83", "bootable": True},
        {"start": 67584, "type": "ef"}])
    assert (found["label"], found["id"]) == ("dos", "0x14fc63d2")
    parts = [{k: v for k, v in p.items() if k != "node"} for p in found["partitions"]]
    assert parts == [{"start": 2048, "size": 65536, "type": "83", "bootable": True},
                     {"start": 67584, "size": 131072 - 67584, "type": "ef"}]


def test_mbr_is_dos_and_sfdisk_places_what_is_left_out(aosbuild: Aosbuild) -> None:
    found = partitioned(aosbuild, label="mbr", uuid="0x0000abcd", partitions=[{"size": 4096}, {}])
    assert found["label"] == "dos"
    assert [(p["start"], p["size"], p["type"]) for p in found["partitions"]] == [
        (2048, 4096, "83"), (6144, 131072 - 6144, "83")]


def test_gpt(aosbuild: Aosbuild) -> None:
    found = partitioned(aosbuild, label="gpt", uuid="D209C89E-EA5E-4FBD-B161-B461CCE297E0", partitions=[
        {"start": 2048, "size": 2048, "type": BIOS_BOOT, "name": "BIOS-BOOT", "uuid":
         "FAC7F1FB-3E8D-4137-A512-961DE09A5549", "partnum": 1},
        {"start": 4096, "size": 8192, "type": ESP, "name": "EFI System", "attrs": [0]},
        {"start": 12288, "type": LINUX, "name": "root", "attrs": [60, 2, 48], "partnum": 4}])
    assert (found["label"], found["id"]) == ("gpt", "D209C89E-EA5E-4FBD-B161-B461CCE297E0")
    parts = {p["node"][-1]: p for p in found["partitions"]}
    assert sorted(parts) == ["1", "2", "4"]
    assert parts["1"]["uuid"] == "FAC7F1FB-3E8D-4137-A512-961DE09A5549"
    assert [(p["start"], p["type"], p["name"], p.get("attrs")) for _, p in sorted(parts.items())] == [
        (2048, BIOS_BOOT, "BIOS-BOOT", None),
        (4096, ESP, "EFI System", "RequiredPartition"),
        (12288, LINUX, "root", "LegacyBIOSBootable GUID:48,60")]
    assert 100000 < parts["4"]["size"] <= found["lastlba"] - 12288 + 1  # the rest of the disk, aligned


def test_replaces_the_table(aosbuild: Aosbuild) -> None:
    description = manifest(pipeline(
        "image", stage("org.osbuild.truncate", filename="disk.img", size="64M"),
        on_device("org.osbuild.sfdisk", label="gpt", uuid="D209C89E-EA5E-4FBD-B161-B461CCE297E0",
                  partitions=[{"size": 2048}, {"size": 2048}]),
        on_device("org.osbuild.sfdisk", label="dos", uuid="0x00000001", partitions=[{"start": 4096}])))
    result = export(aosbuild, description, "image")
    assert result.returncode == 0, result.stderr
    found = table(aosbuild.output / "image" / "disk.img")
    assert (found["label"], [p["start"] for p in found["partitions"]]) == ("dos", [4096])


def test_a_device_over_part_of_a_file(aosbuild: Aosbuild) -> None:
    # a disk inside a file: the table lands at the device's start, the file around it is untouched
    description = manifest(pipeline(
        "image", stage("org.osbuild.truncate", filename="disk.img", size="64M"),
        on_device("org.osbuild.sfdisk", loopback(start=8192, size=65536), label="dos", uuid="0x00000002",
                  partitions=[{"start": 2048, "size": 1024}])))
    result = export(aosbuild, description, "image")
    assert result.returncode == 0, result.stderr
    data = (aosbuild.output / "image" / "disk.img").read_bytes()
    assert data[8192 * 512 + 510:8192 * 512 + 512] == b"\x55\xaa"
    assert data[:8192 * 512] == bytes(8192 * 512)


def test_reserved_attribute_bits_are_refused(aosbuild: Aosbuild) -> None:
    description = manifest(pipeline("image", stage("org.osbuild.truncate", filename="disk.img", size="8M"),
                                    on_device("org.osbuild.sfdisk", label="gpt", uuid="x",
                                              partitions=[{"attrs": [3]}])))
    result = aosbuild(description)
    assert result.returncode == 1
    assert "GPT attribute bit 3 is reserved" in result.stderr


@pytest.mark.parametrize(("options", "location", "message"), [
    ({"label": "gpt"}, "", "'uuid' is a required property"),
    ({"label": "sun", "uuid": "x"}, ".label", "'sun' is not one of ['mbr', 'dos', 'gpt']"),
    ({"label": "gpt", "uuid": "x", "partitions": [{"start": "2048"}]}, ".partitions[0].start",
     "'2048' is not of type 'integer'"),
    ({"label": "gpt", "uuid": "x", "partitions": [{"attrs": [64]}]}, ".partitions[0].attrs[0]",
     "64 is greater than the maximum of 63"),
])
def test_bad_options(aosbuild: Aosbuild, options: dict[str, Any], location: str, message: str) -> None:
    result = aosbuild(manifest(pipeline("image", on_device("org.osbuild.sfdisk", **options))))
    assert_invalid(result, ".pipelines[0].stages[0].options" + location, message)


def test_without_a_device_says_what_to_add(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("image", stage("org.osbuild.sfdisk", label="dos", uuid="0x1"))))
    assert result.returncode == 1
    assert "add an org.osbuild.loopback device 'device'" in result.stderr
