"""Helpers for the disk stage and assembler tests: loopback devices, partition tables, partitions as files.

The kernel here may not parse partition tables and cannot mount vfat, so the checks read images the way
the stages write them: `sfdisk --json` on the image file, and each partition copied out at its offset
for e2fsck, debugfs, fsck.fat and mtools.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import stage

GRUB_DIR = Path("/usr/lib/grub/i386-pc")
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


def loopback(filename: str = "disk.img", **options: Any) -> dict[str, Any]:
    return {"type": "org.osbuild.loopback", "options": {"filename": filename, **options}}


def on_device(type_: str, device: dict[str, Any] | None = None, /, **options: Any) -> dict[str, Any]:
    """A stage that works on the manifest device named `device` (the whole disk by default)."""
    return {**stage(type_, **options), "devices": {"device": device or loopback()}}


def tree_input(name: str) -> dict[str, Any]:
    return {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": [f"name:{name}"]}


def table(image: Path) -> dict[str, Any]:
    """The partition table as `sfdisk --json` reads it from the image file."""
    out = subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True, check=True).stdout
    result: dict[str, Any] = json.loads(out)["partitiontable"]
    return result


def extract(image: Path, start: int, size: int, dest: Path) -> Path:
    """Copy `size` sectors from sector `start` of the image into a file of their own."""
    with image.open("rb") as src, dest.open("wb") as dst:
        src.seek(start * 512)
        dst.write(src.read(size * 512))
    return dest


def e2fsck(partition: Path) -> None:
    check = subprocess.run(["e2fsck", "-fn", str(partition)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def debugfs(partition: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(partition)], capture_output=True, text=True,
                          check=True).stdout


def superblock(partition: Path) -> dict[str, str]:
    """The fields of `dumpe2fs -h`, e.g. "Filesystem UUID" and "Filesystem volume name"."""
    out = subprocess.run(["dumpe2fs", "-h", str(partition)], capture_output=True, text=True, check=True).stdout
    return {key.strip(): value.strip() for key, sep, value in (line.partition(":") for line in out.splitlines())
            if sep}


def qemu_img_info(path: Path, fmt: str | None = None) -> dict[str, Any]:
    """`qemu-img info`; name the format where probing cannot tell it (a fixed vpc looks raw)."""
    argv = ["qemu-img", "info", "--output", "json", *(["-f", fmt] if fmt else []), str(path)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def boot_to_grub(image: Path, fmt: str, expect: str, timeout: float = 90) -> str:
    """Boot the image in QEMU (TCG, no KVM here) until GRUB shows `expect` on the serial console.

    Returns the console output. The image is opened with `snapshot=on`, so it is not changed.
    """
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-nographic", "-m", "256", "-nic", "none",
            "-drive", f"file={image},format={fmt},if=virtio,snapshot=on"]
    seen = b""
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        try:
            deadline = time.monotonic() + timeout
            while expect.encode() not in seen:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"GRUB did not show {expect!r} within {timeout} s; console: {seen[-3000:]!r}"
                ready, _, _ = select.select([proc.stdout], [], [], remaining)
                if ready:
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    assert chunk, f"QEMU exited ({proc.wait()}); console: {seen[-3000:]!r}"
                    seen += chunk
        finally:
            proc.kill()
    return seen.decode(errors="replace")
