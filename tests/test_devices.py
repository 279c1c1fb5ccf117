"""Devices and mounts on real loop devices: attached for a stage, detached after it, whatever happens."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from aosbuild.devices import has_device_mapper

from .conftest import Aosbuild, check_jsonseq, manifest, pipeline, stage
from .leftovers import loops_backed_by, mounts_under, processes_mentioning, stray_mounts

# the store is a tmpfs mounted nodev, as /dev/shm is on a stock Debian 12: devices must work on it
pytestmark = pytest.mark.usefixtures("nodev_store")

HELLO = "sha256:f80caab74e43203d39d78d3548f5834bb310959a1020f2c9c4c4610e04a24e64"
START, SIZE = 2048, 129024


def loopback(**options: Any) -> dict[str, Any]:
    return {"type": "org.osbuild.loopback", "options": {"filename": "disk.img", **options}}


def disk_manifest(*extra_stages: dict[str, Any]) -> dict[str, Any]:
    files = {"type": "org.osbuild.files", "origin": "org.osbuild.source", "references": [HELLO]}
    tree = pipeline("tree", stage("org.osbuild.mkdir", paths=[{"path": "/etc"}]),
                    {"type": "org.osbuild.copy", "inputs": {"f": files},
                     "options": {"paths": [{"from": f"input://f/{HELLO}", "to": "tree:///etc/hello"}]}})
    tree_input = {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": ["name:tree"]}
    image = pipeline(
        "image",
        stage("org.osbuild.truncate", filename="disk.img", size="64M"),
        {"type": "org.osbuild.mkfs.ext4", "options": {"uuid": "6e4ff95f-f662-45ee-a82a-bdf44a2d0b75"},
         "devices": {"device": loopback(start=START, size=SIZE)}},
        {"type": "org.osbuild.copy", "inputs": {"tree": tree_input},
         "devices": {"disk": loopback(start=START, size=SIZE)},
         "mounts": [{"name": "root", "type": "org.osbuild.ext4", "source": "disk", "target": "/"}],
         "options": {"paths": [{"from": "input://tree/", "to": "mount://root/"}]}},
        *extra_stages)
    return manifest(tree, image, sources={"org.osbuild.inline": {"items": {
        HELLO: {"encoding": "base64", "data": "aGVsbG8gb3NidWlsZAo="}}}})


def read_ext4(image: Path, start: int, size: int, path: str, workdir: Path) -> str:
    partition = workdir / "partition.img"
    with image.open("rb") as src, partition.open("wb") as dst:
        src.seek(start * 512)
        dst.write(src.read(size * 512))
    check = subprocess.run(["e2fsck", "-fn", str(partition)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(partition)], capture_output=True, text=True,
                          check=True).stdout


def test_filesystem_on_a_partition_offset(aosbuild: Aosbuild) -> None:
    result = aosbuild(disk_manifest(), "--export", "image", "--output-directory", str(aosbuild.output),
                      "--monitor", "jsonseq")
    assert result.returncode == 0, result.stderr
    check_jsonseq(result.stdout)
    assert read_ext4(aosbuild.output / "image" / "disk.img", START, SIZE, "/etc/hello", aosbuild.workdir) == \
        "hello osbuild\n"
    assert loops_backed_by(aosbuild.workdir) == []
    assert stray_mounts(aosbuild.workdir) == []


def test_stage_requests_a_loop_device(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("tree", stage("org.osbuild.truncate", filename="data.img", size="1M"),
                          stage("org.aosbuild.test.loop", filename="data.img", offset=4096, text="through")))
    result = aosbuild(m, "--export", "tree", "--output-directory", str(aosbuild.output))
    assert result.returncode == 0, result.stderr
    data = (aosbuild.output / "tree" / "data.img").read_bytes()
    assert data[4096:4103] == b"through"
    assert loops_backed_by(aosbuild.workdir) == []


def test_failing_stage_with_mounts_leaves_nothing(aosbuild: Aosbuild) -> None:
    failing = {"type": "org.aosbuild.test.fail", "options": {"exit": 1},
               "devices": {"disk": loopback(start=START, size=SIZE)},
               "mounts": [{"name": "root", "type": "org.osbuild.ext4", "source": "disk", "target": "/"}]}
    result = aosbuild(disk_manifest(failing))
    assert result.returncode == 1
    assert "org.aosbuild.test.fail" in result.stderr
    assert loops_backed_by(aosbuild.workdir) == []
    assert stray_mounts(aosbuild.workdir) == []
    assert list((aosbuild.store / "stage").iterdir()) == []


@contextmanager
def hanging_build(aosbuild: Aosbuild, m: dict[str, Any]) -> Iterator[subprocess.Popen[bytes]]:
    """The build of `m` (`--monitor jsonseq`) in the background, once its hanging stage has written through
    its device. Whatever the block does, the build is killed if it still runs and its pipes are closed: a
    failed assertion must not leave them to the garbage collector, whose ResourceWarning fails a later test."""
    proc = subprocess.Popen(aosbuild.command(m, "--monitor", "jsonseq"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=aosbuild.workdir)
    assert proc.stdout is not None
    try:
        while True:
            line = proc.stdout.readline()
            assert line, "the build ended before the hanging stage"
            if json.loads(line[1:]).get("message", "").startswith("wrote through"):
                break
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_with_devices_and_mounts(aosbuild: Aosbuild, signum: int) -> None:
    hanging = {"type": "org.aosbuild.test.loop", "options": {"filename": "disk.img", "text": "x", "hang": 120},
               "devices": {"disk": loopback(start=START, size=SIZE)},
               "mounts": [{"name": "root", "type": "org.osbuild.ext4", "source": "disk", "target": "/"}]}
    with hanging_build(aosbuild, disk_manifest(hanging)) as proc:
        # the manifest's device and the one the stage asked for (by its file's sandbox path)
        assert len(loops_backed_by(aosbuild.workdir)) == 2
        # the stage's /dev is mounted in its own mount namespaces only (its sandbox's, and the one its bwrap
        # runs in, made for it by the layered store's mount prefix), not on the host's tree
        assert [str(m) for m in mounts_under(aosbuild.workdir)
                if m.source == "aosbuild-dev" and not m.command.startswith("bwrap ")] == []
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == {int(signal.SIGINT): 130, int(signal.SIGTERM): 143}[signum], stderr.decode()
    assert loops_backed_by(aosbuild.workdir) == []
    assert stray_mounts(aosbuild.workdir) == []
    assert processes_mentioning(str(aosbuild.workdir)) == []
    assert list((aosbuild.store / "stage").iterdir()) == []
    assert list((aosbuild.store / "tmp").iterdir()) == []


# -- devices with a parent: partitions of a loopback disk, found in its partition table --------------------

P1 = (2048, 16384)  # start and size in sectors of the tables' two partitions
P2 = (18432, 110592)
DISK_IDS = {"dos": "0x5ca1ab1e", "gpt": "d209c89e-ea5e-4fbd-b161-b461cce297e0"}
LINUX = {"dos": "83", "gpt": "0fc63daf-8483-4772-8e79-3d69d8477de4"}  # a Linux filesystem's partition type


def partitioned_manifest(label: str, *extra_stages: dict[str, Any]) -> dict[str, Any]:
    """A disk with two partitions (MBR or GPT); ext4 on the second one, through partition devices whose
    parent is a loopback device of the whole disk (listed after them: the order is the parents')."""
    tree_input = {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": ["name:tree"]}
    devices = {"root": {"type": "org.aosbuild.partition", "parent": "disk", "options": {"number": 2}},
               "disk": loopback()}
    image = pipeline(
        "image",
        stage("org.osbuild.truncate", filename="disk.img", size="64M"),
        {"type": "org.osbuild.sfdisk", "devices": {"device": loopback()},
         "options": {"label": label, "uuid": DISK_IDS[label], "partitions": [
             {"start": P1[0], "size": P1[1], "type": LINUX[label]},
             {"start": P2[0], "size": P2[1], "type": LINUX[label]}]}},
        {"type": "org.osbuild.mkfs.ext4", "options": {"uuid": "6e4ff95f-f662-45ee-a82a-bdf44a2d0b75"},
         "devices": {"device": devices["root"], "disk": devices["disk"]}},
        {"type": "org.osbuild.copy", "inputs": {"tree": tree_input}, "devices": devices,
         "mounts": [{"name": "root", "type": "org.osbuild.ext4", "source": "root", "target": "/"}],
         "options": {"paths": [{"from": "input://tree/", "to": "mount://root/"}]}},
        *extra_stages)
    m = disk_manifest()
    m["pipelines"][1] = image
    return m


@pytest.mark.parametrize("label", ["dos", "gpt"])
def test_filesystem_on_a_partition_device(aosbuild: Aosbuild, label: str) -> None:
    result = aosbuild(partitioned_manifest(label), "--export", "image", "--output-directory",
                      str(aosbuild.output), "--monitor", "jsonseq")
    assert result.returncode == 0, result.stderr
    check_jsonseq(result.stdout)
    disk = aosbuild.output / "image" / "disk.img"
    assert read_ext4(disk, *P2, "/etc/hello", aosbuild.workdir) == "hello osbuild\n"
    # the filesystem is the second partition's, exactly: the first one is untouched zeros
    with disk.open("rb") as f:
        f.seek(P1[0] * 512)
        assert f.read(P1[1] * 512) == bytes(P1[1] * 512)
    assert loops_backed_by(aosbuild.workdir) == []


def test_partition_device_while_the_stage_runs(aosbuild: Aosbuild) -> None:
    """The stage sees the disk and the partition as loop devices, the partition's backed by the disk's;
    a signal while it runs detaches both."""
    hanging = {"type": "org.aosbuild.test.loop", "options": {"filename": "disk.img", "text": "x", "hang": 120},
               "devices": {"root": {"type": "org.aosbuild.partition", "parent": "disk", "options": {"number": 2}},
                           "disk": loopback()},
               "mounts": [{"name": "root", "type": "org.osbuild.ext4", "source": "root", "target": "/"}]}
    with hanging_build(aosbuild, partitioned_manifest("gpt", hanging)) as proc:
        loops = {loop["name"]: loop for loop in json.loads(subprocess.run(
            ["losetup", "--list", "--json", "--output", "NAME,BACK-FILE,OFFSET,SIZELIMIT"],
            capture_output=True, text=True, check=True).stdout)["loopdevices"]}
        ours = loops_backed_by(aosbuild.workdir)
        assert len(ours) == 3  # the disk, its partition, and the one the stage asked for
        partitions = [loop for name in ours if (loop := loops[f"/dev/{name}"])["back-file"].startswith("/dev/loop")]
        assert [(int(p["offset"]), int(p["sizelimit"])) for p in partitions] == [(P2[0] * 512, P2[1] * 512)]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr.decode()
    assert loops_backed_by(aosbuild.workdir) == []
    assert stray_mounts(aosbuild.workdir) == []
    assert list((aosbuild.store / "stage").iterdir()) == []


@pytest.mark.parametrize(("device", "message"), [
    ({"type": "org.aosbuild.partition", "parent": "disk", "options": {"number": 3}},
     "device 'root' (partition 3 of its parent): the disk has no partition 3 (it has 1, 2)"),
    ({"type": "org.aosbuild.partition", "options": {"number": 1}}, "needs a parent"),
])
def test_device_that_cannot_be_opened_fails_the_stage_and_leaves_nothing(aosbuild: Aosbuild,
                                                                          device: dict[str, Any],
                                                                          message: str) -> None:
    failing = {"type": "org.aosbuild.test.fail", "options": {"exit": 1},
               "devices": {"root": device, "disk": loopback()}}
    result = aosbuild(partitioned_manifest("dos", failing))
    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    assert loops_backed_by(aosbuild.workdir) == []
    assert stray_mounts(aosbuild.workdir) == []


def test_device_mapper_devices_are_refused_before_the_build(aosbuild: Aosbuild) -> None:
    """LUKS and LVM devices need the kernel's device-mapper; aosbuild has neither device type."""
    failing = {"type": "org.aosbuild.test.fail", "options": {"exit": 1},
               "devices": {"crypt": {"type": "org.osbuild.luks2", "parent": "disk", "options": {"passphrase": "x"}},
                           "lv": {"type": "org.osbuild.lvm2.lv", "parent": "disk", "options": {"volume": "root"}},
                           "disk": loopback()}}
    result = aosbuild(partitioned_manifest("dos", failing))
    assert result.returncode == 2, result.stderr
    assert "could not find schema information for 'org.osbuild.luks2'" in result.stdout
    assert "could not find schema information for 'org.osbuild.lvm2.lv'" in result.stdout
    # osbuild's problems on stdout; on stderr one line that says why and what to do
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"Error: {aosbuild.workdir / 'manifest.json'}: aosbuild has no module of its own for "
                           "org.osbuild.luks2 and org.osbuild.lvm2.lv devices (device-mapper devices): build with "
                           "osbuild's library, `--libdir /usr/lib/osbuild`, whose modules open them, on a kernel "
                           "with device-mapper"), line
    assert ("this one has none: /dev/mapper/control cannot be opened" in line) == (not has_device_mapper())
