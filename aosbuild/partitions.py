"""Reading a disk's partition table (MBR or GPT), so a partition can be reached without the kernel's help.

The kernel of a build host may not parse partition tables (no partscan nodes for a loop device), so the
engine finds a partition's sectors itself and attaches a loop device over just those.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from .errors import SandboxError

SECTOR = 512
MBR_SIGNATURE = b"\x55\xaa"
GPT_PROTECTIVE = 0xEE
MBR_EXTENDED = (0x05, 0x0F, 0x85)
GPT_SIGNATURE = b"EFI PART"


@dataclass(frozen=True, slots=True, kw_only=True)
class Partition:
    number: int  # as the kernel numbers it: 1 for the first entry of the table
    start: int  # in sectors of SECTOR bytes
    size: int


def _read(fd: int, offset: int, size: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise SandboxError(f"the disk ends at byte {offset + len(data)}, inside its partition table")
    return data


def _gpt(fd: int) -> list[Partition]:
    header = _read(fd, SECTOR, 92)
    if header[:8] != GPT_SIGNATURE:
        raise SandboxError("the disk's MBR says GPT, but there is no GPT header in sector 1")
    entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
    table = _read(fd, entries_lba * SECTOR, count * entry_size)
    found = []
    for index in range(count):
        entry = table[index * entry_size:(index + 1) * entry_size]
        if entry[:16] == bytes(16):  # an unused entry: no type
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        found.append(Partition(number=index + 1, start=first, size=last - first + 1))
    return found


def read_partitions(fd: int) -> list[Partition]:
    """The partitions of the disk open at `fd` (primary MBR partitions, or GPT's)."""
    mbr = _read(fd, 0, SECTOR)
    if mbr[510:512] != MBR_SIGNATURE:
        raise SandboxError("the disk has no partition table (no MBR signature)")
    found = []
    for index in range(4):
        kind = mbr[446 + 16 * index + 4]
        start, size = struct.unpack_from("<II", mbr, 446 + 16 * index + 8)
        if kind == GPT_PROTECTIVE:
            return _gpt(fd)
        if kind in MBR_EXTENDED:
            raise SandboxError("the disk has an extended partition: logical partitions are not supported")
        if kind and size:
            found.append(Partition(number=index + 1, start=start, size=size))
    return found


def find_partition(fd: int, number: int) -> Partition:
    partitions = read_partitions(fd)
    for partition in partitions:
        if partition.number == number:
            return partition
    have = ", ".join(str(p.number) for p in partitions) or "none"
    raise SandboxError(f"the disk has no partition {number} (it has {have})")
