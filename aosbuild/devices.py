"""Devices of a stage: the sandbox's own /dev, and the devices the manifest asks for.

The sandbox's /dev is a small tmpfs the engine makes for the stage (attached in its scratch space where
bwrap sees it) and bwrap binds into the sandbox, so device nodes can be added while the stage runs (a
stage's `loop.attach` request). Being a mount of its own, without `nodev`, its nodes work whatever the
store's filesystem is mounted with (a stock Debian mounts /dev/shm and /tmp `nodev`). It holds the usual
character devices and a node for each loop device attached for the stage, and is gone when the stage ends.

A stage's devices are opened in the manifest's dependency order, parents first, as osbuild opens them:
`org.osbuild.loopback` (a file of the tree) and `org.aosbuild.partition` (one partition of its parent,
read from the parent's partition table, as a loop device over the parent's sectors: the kernel need not
parse partition tables). Both are loop devices, which the stage's loop server detaches in reverse order
of attaching, children before parents, however the stage ends. LUKS (`org.osbuild.luks2`) and LVM
(`org.osbuild.lvm2.lv`) need the kernel's device-mapper: aosbuild has no native version of them and
runs an osbuild library's modules for them as osbuild's host services (`aosbuild.hostservices`).
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio

from .confine import relative_path, resolve_inside
from .errors import Problem, SandboxError
from .loop import LoopDevice, LoopServer
from .manifest import Device
from .moduleinfo import ModuleInfo
from .mountns import SYS_FSCONFIG, SYS_FSMOUNT, SYS_FSOPEN, move_mount, syscall
from .partitions import SECTOR, find_partition
from .sandbox import DEV_SOURCE
from .sandboxside.runnerlib import MNT_DETACH, umount

# name -> (major, minor) of the character devices every sandbox gets
BASIC_NODES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
FUSE_NODE = (10, 229)
LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
         "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}


DEV_MOUNT_OPTIONS = "mode=0755,size=64k"  # nodes take no room; nothing else belongs there


class DevDir:
    """The tmpfs that becomes /dev in the sandbox, made detached (`detached_tmpfs`) and reached through
    its descriptor `fd`. It is attached at `path` only where bwrap needs to find it: in the stage's own
    mount namespace when it has one (`mountns`, by `attach`), so that the host never sees it and an
    engine killed at any moment leaves nothing mounted; else on the host (`attach_on_host`), until the
    sandbox has bound it (`leave_host`)."""

    def __init__(self, path: Path, fd: int, *, osbuild_layout: bool = False) -> None:
        self.path = path
        self.fd = fd
        self.on_host = False
        self._leaving: threading.Thread | None = None
        self._leave_error: OSError | None = None
        for name, (major, minor) in BASIC_NODES.items():
            os.mknod(name, 0o666 | stat.S_IFCHR, os.makedev(major, minor), dir_fd=self.fd)
        if osbuild_layout:
            # what osbuild's buildroot gives its modules: those nodes, /dev/fuse where the host has it
            if os.path.exists("/dev/fuse"):
                os.mknod("fuse", 0o666 | stat.S_IFCHR, os.makedev(*FUSE_NODE), dir_fd=self.fd)
        else:
            for name, target in LINKS.items():
                os.symlink(target, name, dir_fd=self.fd)
            os.mkdir("pts", dir_fd=self.fd)
        os.mkdir("shm", dir_fd=self.fd)

    def attach(self) -> None:
        """Mount it at `path` in the calling thread's mount namespace (once: it moves there)."""
        move_mount(self.fd, os.fspath(self.path))

    def attach_on_host(self) -> None:
        self.attach()
        self.on_host = True

    def host_path(self) -> Path:
        """`path`, where host processes (osbuild's device services) find it: attached on the host now."""
        if not self.on_host and self._leaving is None:
            self.attach_on_host()
        return self.path

    def add_loop(self, device: LoopDevice) -> str:
        """Make the device (and its partitions) visible in the sandbox; returns its sandbox path."""
        os.mknod(device.name, 0o600 | stat.S_IFBLK, os.makedev(device.major, device.minor), dir_fd=self.fd)
        for name, major, minor in device.partitions:
            os.mknod(name, 0o600 | stat.S_IFBLK, os.makedev(major, minor), dir_fd=self.fd)
        return f"/dev/{device.name}"

    def leave_host(self) -> None:
        """Take the tmpfs off the host's mount tree, once the sandbox has bound it as its /dev: it lives
        on as the sandbox's /dev and through `fd`, and with them it goes, even if the engine is killed.
        Returns when it is off (waiting for `leave_host_soon`'s, if that began it)."""
        if self._leaving is not None:
            self._leaving.join()
            self._leaving = None
            if self._leave_error is not None:
                error, self._leave_error = self._leave_error, None
                raise error
        elif self.on_host:
            self.on_host = False
            umount(os.fspath(self.path), MNT_DETACH)

    def leave_host_soon(self) -> None:
        """`leave_host` in a thread of its own: the unmount waits for the kernel (an RCU grace period,
        1-2 ms of each stage on a loaded machine), which the stage, waiting for its answer, need not.
        `leave_host` (at the stage's end at the latest) waits for it and raises what it raised."""
        if self.on_host and self._leaving is None:
            self.on_host = False
            self._leaving = threading.Thread(target=self._unmount, name="aosbuild-dev-leave", daemon=True)
            self._leaving.start()

    def _unmount(self) -> None:
        try:
            umount(os.fspath(self.path), MNT_DETACH)
        except OSError as exc:
            self._leave_error = exc


@asynccontextmanager
async def open_dev_dir(path: Path, *, osbuild_layout: bool = False) -> AsyncIterator[DevDir]:
    """A fresh tmpfs for the sandbox's /dev, to be attached at `path` (created here) by `DevDir.attach`
    or `attach_on_host`; off the host on exit, however the stage ended (lazily: a process of the stage
    that is still going would otherwise keep it busy), and gone with its last user. `osbuild_layout`:
    only the nodes osbuild gives a module of its library, no links or `pts`."""
    os.mkdir(path)
    try:
        fd = detached_tmpfs(DEV_SOURCE, DEV_MOUNT_OPTIONS, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC)
    except OSError as exc:
        raise SandboxError(f"cannot make a tmpfs for the stage's /dev: {exc.strerror}; stages need root: "
                           "run aosbuild as root") from exc
    try:
        devdir = DevDir(path, fd, osbuild_layout=osbuild_layout)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield devdir
    finally:
        try:
            devdir.leave_host()
        finally:
            os.close(devdir.fd)


MOUNT_ATTR_NOSUID, MOUNT_ATTR_NOEXEC = 0x2, 0x8
FSOPEN_CLOEXEC = FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 1, 6


def detached_tmpfs(source: str, options: str, attributes: int) -> int:
    """A tmpfs mounted nowhere (fsopen/fsmount): a descriptor of its root. It is freed when the last
    descriptor closes and no mount namespace holds it: an engine's death cannot leave it mounted."""
    fs = syscall(SYS_FSOPEN, b"tmpfs", FSOPEN_CLOEXEC)
    try:
        syscall(SYS_FSCONFIG, fs, FSCONFIG_SET_STRING, b"source", source.encode(), 0)
        for option in options.split(","):
            key, _, value = option.partition("=")
            syscall(SYS_FSCONFIG, fs, FSCONFIG_SET_STRING, key.encode(), value.encode(), 0)
        syscall(SYS_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0)
        return syscall(SYS_FSMOUNT, fs, FSMOUNT_CLOEXEC, attributes)
    finally:
        os.close(fs)


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenDevice:
    argument: dict[str, Any]  # what the stage is told: its path in the sandbox and its node
    host_path: str  # its node on the host, where a child device opens it


class DeviceOpener(Protocol):
    async def __call__(self, device: Device, parent: OpenDevice | None, *, tree: Path, devdir: DevDir,
                       loops: LoopServer) -> OpenDevice: ...


def _backing_file(tree: Path, filename: str) -> Path:
    """The loader checked `filename` lexically; the tree may hold symlinks, so check it again resolved."""
    relative, _ = relative_path(filename)
    path = resolve_inside(tree, relative) if relative else None
    if path is None:
        raise SandboxError(f"loopback device file '{filename}' is outside the tree: name a file of the "
                           "pipeline's tree, with no symbolic link leading out of it")
    if not path.is_file():
        raise SandboxError(f"loopback device file '{filename}' does not exist in the tree: make it in an "
                           "earlier stage (org.osbuild.truncate, say)")
    return path


def _opened(loop: LoopDevice, devdir: DevDir) -> OpenDevice:
    return OpenDevice(argument={"path": devdir.add_loop(loop), "node": {"major": loop.major, "minor": loop.minor}},
                      host_path=f"/dev/{loop.name}")  # loop.attach made sure the host has the node


async def open_loopback(device: Device, parent: OpenDevice | None, *, tree: Path, devdir: DevDir,
                        loops: LoopServer) -> OpenDevice:
    """`org.osbuild.loopback`: a file of the tree, or `size` sectors of it from `start`. Like osbuild's,
    it ignores a parent."""
    options = device.options
    sector = int(options.get("sector-size", SECTOR))
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
    return _opened(loop, devdir)


async def open_partition(device: Device, parent: OpenDevice | None, *, tree: Path, devdir: DevDir,
                         loops: LoopServer) -> OpenDevice:
    """`org.aosbuild.partition`: partition `number` of the parent device's MBR or GPT table."""
    number = device.options.get("number")
    if parent is None:
        raise SandboxError(f"device '{device.name}': an org.aosbuild.partition device needs a parent: give "
                           "it `parent`, the name of its disk's device")
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise SandboxError(f"device '{device.name}': option 'number' must be a partition number from 1; "
                           "fix it in the manifest")
    read_only = bool(device.options.get("read-only", False))
    fd = os.open(parent.host_path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    try:
        try:
            partition = await anyio.to_thread.run_sync(find_partition, fd, number)
        except SandboxError as exc:
            raise SandboxError(f"device '{device.name}' (partition {number} of its parent): {exc}; check "
                               "`number` and the stage that wrote the partition table") from None
        loop = await loops.attach(fd, offset=partition.start * SECTOR, size=partition.size * SECTOR,
                                  sector_size=SECTOR, read_only=read_only)
    finally:
        os.close(fd)
    return _opened(loop, devdir)


DEVICE_TYPES: dict[str, DeviceOpener] = {"org.osbuild.loopback": open_loopback,
                                         "org.aosbuild.partition": open_partition}
# osbuild's device types that need the kernel's device-mapper: aosbuild has no module of its own for
# them, only osbuild's (a `--libdir` at its library), run as host services
DEVICE_MAPPER_TYPES = ("org.osbuild.luks2", "org.osbuild.lvm2.lv")
DEVICE_MAPPER_CONTROL = "/dev/mapper/control"


def has_device_mapper(control: str = DEVICE_MAPPER_CONTROL) -> bool:
    """Whether this kernel has device-mapper (`dmsetup version` opens the same node)."""
    try:
        os.close(os.open(control, os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def device_mapper_refusal(problems: Sequence[Problem]) -> tuple[str | None, list[Problem]]:
    """One line saying why a manifest's LUKS or LVM devices without a module are refused, and what to do
    (None: there are none), and the other problems. The problems stay osbuild's: clients match them."""
    missing = {f"could not find schema information for '{t}'": t for t in DEVICE_MAPPER_TYPES}
    types = sorted({missing[p.message] for p in problems if p.message in missing})
    if not types:
        return None, list(problems)
    host = "" if has_device_mapper() else (f" (this one has none: {DEVICE_MAPPER_CONTROL} cannot be opened; "
                                           "try `modprobe dm_mod`)")
    return (f"aosbuild has no module of its own for {' and '.join(types)} devices (device-mapper devices): "
            "build with osbuild's library, `--libdir /usr/lib/osbuild`, whose modules open them, on a kernel "
            f"with device-mapper{host}", [p for p in problems if p.message not in missing])


@asynccontextmanager
async def open_devices(devices: dict[str, Device], *, tree: Path, devdir: DevDir, loops: LoopServer,
                       find: Callable[[str], ModuleInfo | None] = lambda name: None,
                       on_line: Callable[[str], None] = lambda text: None,
                       native: Mapping[str, DeviceOpener] = DEVICE_TYPES) -> AsyncIterator[dict[str, Any]]:
    """Open a stage's devices, parents first (`devices` is in dependency order); `loops` detaches them,
    children first, when the stage is done. A type aosbuild lacks is opened by its module's host service
    (`find`), as osbuild does, and closed when the service stops, before the loop devices go. Yields the
    stage's `devices` argument."""
    opened: dict[str, OpenDevice] = {}
    async with AsyncExitStack() as services:
        for name, device in devices.items():
            parent = opened[device.parent.name] if device.parent is not None else None
            opener = native.get(device.type)
            if opener is not None:
                opened[name] = await opener(device, parent, tree=tree, devdir=devdir, loops=loops)
                continue
            module = find(device.type)
            if module is None or module.path is None:
                raise SandboxError(f"device '{name}': aosbuild has no device type {device.type}; give --libdir "
                                   "a library that has it (osbuild's, /usr/lib/osbuild)")
            from .hostservices import open_host_device

            reply = await open_host_device(services, device, module, dev=devdir.host_path(), tree=tree, on_line=on_line,
                                           parent=parent.argument["path"].removeprefix("/dev/") if parent else None)
            relative = reply["path"].lstrip("/")
            opened[name] = OpenDevice(argument={**reply, "path": f"/dev/{relative}"},
                                      host_path=f"{devdir.path}/{relative}")
        yield {name: device.argument for name, device in opened.items()}
