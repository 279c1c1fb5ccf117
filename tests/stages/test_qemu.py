"""org.osbuild.qemu: a raw image of a pipeline converted with qemu-img; checked with `qemu-img info` and compare."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from tests.conftest import Aosbuild, manifest, pipeline, stage

from .disks import loopback, on_device, qemu_img_info
from .treediff import assert_invalid, export

# the store is a tmpfs mounted nodev, as /dev/shm is on a stock Debian 12: devices must work on it
pytestmark = pytest.mark.usefixtures("nodev_store")

IMAGE_INPUT = {"type": "org.osbuild.files", "origin": "org.osbuild.pipeline",
               "references": {"name:image": {"file": "disk.img"}}}
# a partitioned 64 MiB image with a FAT file system on it: something to convert besides zeros
IMAGE = pipeline("image", stage("org.osbuild.truncate", filename="disk.img", size="64M"),
                 on_device("org.osbuild.sfdisk", label="dos", uuid="0x00000001",
                           partitions=[{"start": 2048, "size": 32768, "type": "ef"}]),
                 on_device("org.osbuild.mkfs.fat", loopback(start=2048, size=32768), volid="7B7795E7"))


def convert(filename: str, **fmt: Any) -> dict[str, Any]:
    # qcow2 `compression_type` is aosbuild's: org.aosbuild.qemu takes it, org.osbuild.qemu takes osbuild's options
    name = "org.aosbuild.qemu" if "compression_type" in fmt else "org.osbuild.qemu"
    return {**stage(name, filename=filename, format=fmt), "inputs": {"image": IMAGE_INPUT}}


# format options -> what `qemu-img info` says about the result
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "qcow2": ({"type": "qcow2"}, {"compat": "1.1", "compression-type": "zlib"}),
    "qcow2-zstd": ({"type": "qcow2", "compression_type": "zstd"}, {"compression-type": "zstd"}),
    "qcow2-compat": ({"type": "qcow2", "compat": "0.10", "compression": False}, {"compat": "0.10"}),
    "vmdk": ({"type": "vmdk", "subformat": "streamOptimized", "adapter_type": "lsilogic"},
             {"create-type": "streamOptimized"}),
    "vmdk-plain": ({"type": "vmdk", "compression": False}, {"create-type": "monolithicSparse"}),
    "vpc": ({"type": "vpc"}, {}),
    "vpc-dynamic": ({"type": "vpc", "subformat": "dynamic"}, {}),
    "vdi": ({"type": "vdi"}, {}),
    "vhdx": ({"type": "vhdx"}, {}),
}


def test_formats(aosbuild: Aosbuild) -> None:
    pipelines = [pipeline(name, convert(f"/disk.{name}", **fmt)) for name, (fmt, _) in CASES.items()]
    result = export(aosbuild, manifest(IMAGE, *pipelines), "image", *CASES)
    assert result.returncode == 0, result.stderr
    raw = aosbuild.output / "image" / "disk.img"
    for name, (fmt, expected) in CASES.items():
        converted = aosbuild.output / name / f"disk.{name}"
        assert [p.name for p in converted.parent.iterdir()] == [converted.name]
        info = qemu_img_info(converted, fmt["type"])
        assert (info["format"], info["virtual-size"]) == (fmt["type"], 64 << 20), name
        specific = info.get("format-specific", {}).get("data", {})
        assert {key: specific.get(key) for key in expected} == expected, name
        same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt["type"], str(raw), str(converted)],
                              capture_output=True, text=True)
        assert same.returncode == 0, (name, same.stdout)


def test_compression_shrinks(aosbuild: Aosbuild) -> None:
    src = pipeline("image", stage("org.osbuild.truncate", filename="disk.img", size="8M"),
                   stage("org.aosbuild.test.loop", filename="disk.img", text="x" * 4096))
    plain = pipeline("plain", convert("disk.qcow2", type="qcow2", compression=False))
    packed = pipeline("packed", convert("disk.qcow2", type="qcow2", compression_type="zstd"))
    result = export(aosbuild, manifest(src, plain, packed), "plain", "packed")
    assert result.returncode == 0, result.stderr
    sizes = [(aosbuild.output / name / "disk.qcow2").stat().st_size for name in ("plain", "packed")]
    assert sizes[1] < sizes[0]


def test_replaces_a_symlink_instead_of_writing_through_it(aosbuild: Aosbuild) -> None:
    # the link points at the build root's /etc/passwd in the sandbox (read-only there, but all the same)
    link = stage("org.osbuild.ln", paths=[{"target": "/etc/passwd", "link_name": "tree:///disk.qcow2",
                                           "symbolic": True}])
    result = export(aosbuild, manifest(IMAGE, pipeline("out", link, convert("/disk.qcow2", type="qcow2"))), "out")
    assert result.returncode == 0, result.stderr
    converted = aosbuild.output / "out" / "disk.qcow2"
    assert not converted.is_symlink()
    assert qemu_img_info(converted)["format"] == "qcow2"


@pytest.mark.parametrize(("fmt", "location", "message"), [
    ({"type": "qcow2", "compression_type": "lz4"}, ".format", "{'type': 'qcow2', 'compression_type': 'lz4'} is not"),
    ({"type": "raw"}, ".format", "{'type': 'raw'} is not valid"),
    ({"type": "vpc", "subformat": "fixed", "compat": "1.1"}, ".format", "{'type': 'vpc'"),
])
def test_bad_options(aosbuild: Aosbuild, fmt: dict[str, Any], location: str, message: str) -> None:
    result = aosbuild(manifest(IMAGE, pipeline("out", convert("disk.out", **fmt))))
    assert_invalid(result, ".pipelines[1].stages[0].options" + location, message)


def test_without_an_image_input_says_what_to_add(aosbuild: Aosbuild) -> None:
    result = aosbuild(manifest(pipeline("out", stage("org.osbuild.qemu", filename="x", format={"type": "vdi"}))))
    assert result.returncode == 1
    assert "add an org.osbuild.files input 'image'" in result.stderr


def test_org_osbuild_qemu_takes_no_compression_type(aosbuild: Aosbuild) -> None:
    fmt = {"type": "qcow2", "compression_type": "zstd"}
    bad = {**stage("org.osbuild.qemu", filename="disk.qcow2", format=fmt), "inputs": {"image": IMAGE_INPUT}}
    assert_invalid(aosbuild(manifest(IMAGE, pipeline("out", bad))), ".pipelines[1].stages[0].options.format",
                   "{'type': 'qcow2', 'compression_type': 'zstd'} is not valid under any of the given schemas")
