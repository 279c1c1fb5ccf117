"""Devices of a stage: the sandbox's own /dev, and the loop devices the manifest asks for.

The sandbox's /dev is a small tmpfs the engine mounts for the stage (in the stage's scratch space) and
bind-mounts into the sandbox, so device nodes can be added while the stage runs (a stage's `loop.attach`
request). Being a mount of its own, without `nodev`, its nodes work whatever the store's filesystem is
mounted with (a stock Debian mounts /dev/shm and /tmp `nodev`). It holds the usual character devices
and a node for each loop device attached for the stage, and is unmounted when the stage ends.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from .confine import relative_path, resolve_inside
from .errors import SandboxError
from .loop import LoopDevice, LoopServer
from .manifest import Device
from .runnerlib import MNT_DETACH, mount, umount

# name -> (major, minor) of the character devices every sandbox gets
BASIC_NODES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
         "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}


MS_NOSUID = 2
MS_NOEXEC = 8
DEV_MOUNT_OPTIONS = "mode=0755,size=64k"  # nodes take no room; nothing else belongs there


class DevDir:
    """The directory that becomes /dev in the sandbox (an empty mount of `open_dev_dir`'s), reached
    through a descriptor so that it can leave the host's mount tree while the stage runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.on_host = True
        for name, (major, minor) in BASIC_NODES.items():
            os.mknod(name, 0o666 | stat.S_IFCHR, os.makedev(major, minor), dir_fd=self.fd)
        for name, target in LINKS.items():
            os.symlink(target, name, dir_fd=self.fd)
        os.mkdir("pts", dir_fd=self.fd)
        os.mkdir("shm", dir_fd=self.fd)

    def add_loop(self, device: LoopDevice) -> str:
        """Make the device (and its partitions) visible in the sandbox; returns its sandbox path."""
        os.mknod(device.name, 0o600 | stat.S_IFBLK, os.makedev(device.major, device.minor), dir_fd=self.fd)
        for name, major, minor in device.partitions:
            os.mknod(name, 0o600 | stat.S_IFBLK, os.makedev(major, minor), dir_fd=self.fd)
        return f"/dev/{device.name}"

    def leave_host(self) -> None:
        """Take the tmpfs off the host's mount tree, once the sandbox has bound it as its /dev: it lives
        on as the sandbox's /dev and through `fd`, and with them it goes, even if the engine is killed."""
        if self.on_host:
            self.on_host = False
            umount(os.fspath(self.path), MNT_DETACH)


@asynccontextmanager
async def open_dev_dir(path: Path) -> AsyncIterator[DevDir]:
    """A fresh tmpfs at `path` (created here) for the sandbox's /dev; unmounted on exit, however the
    stage ended. Lazily: a process of the stage that is still going would otherwise keep it busy."""
    os.mkdir(path)
    try:
        mount("aosbuild-dev", os.fspath(path), "tmpfs", MS_NOSUID | MS_NOEXEC, DEV_MOUNT_OPTIONS)
    except OSError as exc:
        raise SandboxError(f"cannot mount a tmpfs for the stage's /dev at {path}: {exc.strerror} "
                           "(stages need root)") from exc
    try:
        devdir = DevDir(path)
    except BaseException:
        umount(os.fspath(path), MNT_DETACH)
        raise
    try:
        yield devdir
    finally:
        try:
            devdir.leave_host()
        finally:
            os.close(devdir.fd)


def _backing_file(tree: Path, filename: str) -> Path:
    """The loader checked `filename` lexically; the tree may hold symlinks, so check it again resolved."""
    relative, _ = relative_path(filename)
    path = resolve_inside(tree, relative) if relative else None
    if path is None:
        raise SandboxError(f"loopback device file '{filename}' is outside the tree")
    if not path.is_file():
        raise SandboxError(f"loopback device file '{filename}' does not exist in the tree")
    return path


async def attach_loopback(device: Device, *, tree: Path, devdir: DevDir, loops: LoopServer) -> dict[str, Any]:
    """Attach an `org.osbuild.loopback` device; returns the stage's argument for it."""
    if device.type != "org.osbuild.loopback":
        raise SandboxError(f"device '{device.name}': aosbuild has no device type {device.type}")
    options = device.options
    sector = int(options.get("sector-size", 512))
    path = _backing_file(tree, str(options["filename"]))
    read_only = bool(options.get("read-only", False))
    fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    try:
        loop = await loops.attach(fd, offset=int(options.get("start", 0)) * sector,
                                  size=int(options.get("size", 0)) * sector, sector_size=sector,
                                  read_only=read_only, partscan=bool(options.get("partscan", False)),
                                  lock=bool(options.get("lock", False)))
    finally:
        os.close(fd)  # the loop device holds its own reference to the file
    return {"path": devdir.add_loop(loop), "node": {"major": loop.major, "minor": loop.minor}}


@asynccontextmanager
async def open_devices(devices: dict[str, Device], *, tree: Path, devdir: DevDir,
                       loops: LoopServer) -> AsyncIterator[dict[str, Any]]:
    """Attach a stage's devices (parents first); `loops` detaches them when the stage is done."""
    arguments: dict[str, Any] = {}
    for name, device in devices.items():
        if device.parent is not None:
            raise SandboxError(f"device '{name}': devices with a parent are not supported yet")
        arguments[name] = await attach_loopback(device, tree=tree, devdir=devdir, loops=loops)
    yield arguments
