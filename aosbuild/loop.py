"""The loop device server: attaches loop devices for stages and always detaches them.

Stages never touch /dev/loop-control. The engine attaches a device over a file descriptor (from the
manifest's `org.osbuild.loopback` devices, or from a stage's `loop.attach` request), with an offset and
size per partition (the kernel here may not parse partition tables), and detaches every device it
attached when the server closes, however the stage ended.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio

from .errors import SandboxError

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LOOP_CLR_FD = 0x4C01
LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_PARTSCAN = 8
LOOP_MAJOR = 7
ATTACH_TRIES = 20


@dataclass(frozen=True, slots=True, kw_only=True)
class LoopDevice:
    number: int
    fd: int
    major: int
    minor: int
    partitions: tuple[tuple[str, int, int], ...] = ()  # (name, major, minor) found by partscan

    @property
    def name(self) -> str:
        return f"loop{self.number}"


def _loop_config(fd: int, *, offset: int, size: int, block_size: int, flags: int) -> bytes:
    # struct loop_info64: 5 x u64 (device, inode, rdevice, offset, sizelimit), 4 x u32 (number,
    # encrypt_type, encrypt_key_size, flags), file_name[64], crypt_name[64], encrypt_key[32], 2 x u64 init
    info = struct.pack("=QQQQQIIII64s64s32sQQ", 0, 0, 0, offset, size, 0, 0, 0, flags, b"", b"", b"", 0, 0)
    # struct loop_config: u32 fd, u32 block_size, loop_info64 info, 8 x u64 reserved
    return struct.pack("=II", fd, block_size) + info + bytes(64)


def _partitions(name: str) -> tuple[tuple[str, int, int], ...]:
    found = []
    for part in sorted(Path("/sys/block", name).glob(f"{name}p*")):
        major, minor = (int(n) for n in (part / "dev").read_text().split(":"))
        found.append((part.name, major, minor))
    return tuple(found)


def attach(backing_fd: int, *, offset: int = 0, size: int = 0, sector_size: int = 512, read_only: bool = False,
           partscan: bool = False, lock: bool = False) -> LoopDevice:
    """Attach a free loop device to `backing_fd` (blocking; run it in a thread)."""
    flags = LO_FLAGS_AUTOCLEAR | (LO_FLAGS_READ_ONLY if read_only else 0) | (LO_FLAGS_PARTSCAN if partscan else 0)
    config = _loop_config(backing_fd, offset=offset, size=size, block_size=sector_size, flags=flags)
    try:
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise SandboxError(f"cannot open /dev/loop-control: {exc.strerror}; loop devices need root and the "
                           "kernel's loop driver: run aosbuild as root (`modprobe loop` if the node is missing)"
                           ) from exc
    try:
        for _ in range(ATTACH_TRIES):
            number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
            path = f"/dev/loop{number}"
            if not os.path.exists(path):
                os.mknod(path, 0o600 | stat.S_IFBLK, os.makedev(LOOP_MAJOR, number))
            fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, LOOP_CONFIGURE, config)
            except OSError as exc:
                os.close(fd)
                if exc.errno == errno.EBUSY:
                    continue  # another process took it between GET_FREE and CONFIGURE
                raise SandboxError(f"cannot attach {path}: {exc.strerror}; check the device's file and options "
                                   "(`start`, `size`, `sector-size`) in the manifest") from exc
            if lock:
                fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            return LoopDevice(number=number, fd=fd, major=os.major(st.st_rdev), minor=os.minor(st.st_rdev),
                              partitions=_partitions(f"loop{number}") if partscan else ())
        raise SandboxError(f"no free loop device after {ATTACH_TRIES} tries: other processes took each one "
                           "first; build again when fewer run (`losetup -l` lists them)")
    finally:
        os.close(control)


def detach(device: LoopDevice) -> None:
    """Flush and detach a loop device (blocking)."""
    try:
        os.fsync(device.fd)  # push the device's dirty pages into the backing file
        fcntl.ioctl(device.fd, LOOP_CLR_FD)
    except OSError as exc:
        if exc.errno not in (errno.ENXIO, errno.EINVAL):
            raise
    finally:
        os.close(device.fd)


class LoopServer:
    """Loop devices attached for one stage; `open_loop_server` detaches them all on exit."""

    def __init__(self) -> None:
        self.devices: list[LoopDevice] = []

    async def attach(self, backing_fd: int, **options: int | bool) -> LoopDevice:
        device = await anyio.to_thread.run_sync(lambda: attach(backing_fd, **options))  # type: ignore[arg-type]
        self.devices.append(device)
        return device

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            while self.devices:
                device = self.devices.pop()
                await anyio.to_thread.run_sync(detach, device)


@asynccontextmanager
async def open_loop_server() -> AsyncIterator[LoopServer]:
    server = LoopServer()
    try:
        yield server
    finally:
        await server.close()
