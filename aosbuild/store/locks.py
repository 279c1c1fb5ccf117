"""Linux open-file-description locks: whole-file read and write locks that belong to an open file.

POSIX record locks (`F_SETLK`) belong to the process: closing any descriptor of the file drops them, and
two locks of one process never conflict, so two tasks of one build could not exclude each other. OFD
locks (`F_OFD_SETLK`, Linux 3.15) belong to the open file description instead: they conflict between
two `open()`s even in one process, are released when the last descriptor of that open file is closed,
and so also when the process dies, however it dies. That last property is how the store tells a live
owner from a dead one: a lock that can be taken has no owner.

Python's `fcntl` has no wrapper for them; the `struct flock` is packed by hand (its 64-bit layout:
`short l_type, l_whence; off_t l_start, l_len; pid_t l_pid`, padded to 32 bytes; `l_pid` must be 0).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

F_OFD_GETLK = 36
F_OFD_SETLK = 37
F_OFD_SETLKW = 38

READ = fcntl.F_RDLCK
WRITE = fcntl.F_WRLCK
UNLOCK = fcntl.F_UNLCK

_FLOCK = struct.Struct("@hhqqi4x")
assert _FLOCK.size == 32, "struct flock is 32 bytes on 64-bit Linux"
_CONTENDED = (errno.EAGAIN, errno.EACCES)


def _flock(kind: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0)  # start 0, length 0: the whole file, however long


def try_lock(fd: int, kind: int) -> bool:
    """Take (or change to, or with UNLOCK drop) a lock without waiting; False if another holds one."""
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, _flock(kind))
    except OSError as exc:
        if exc.errno in _CONTENDED:
            return False
        raise
    return True


def wait_lock(fd: int, kind: int) -> None:
    """Take a lock, waiting for it. This blocks the thread: call it from a worker thread, or where the
    holders are known to keep it for moments only."""
    while True:
        try:
            fcntl.fcntl(fd, F_OFD_SETLKW, _flock(kind))
            return
        except InterruptedError:  # a signal; PEP 475 retries most calls, not fcntl with this command
            continue


def holder(fd: int, kind: int) -> int:
    """The kind of lock that keeps `kind` from being taken now (UNLOCK: nothing does). Takes nothing."""
    result = fcntl.fcntl(fd, F_OFD_GETLK, _flock(kind))
    held: int = _FLOCK.unpack(result)[0]
    return held


def same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open at `fd` (it may have been renamed away or removed)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


class LockFile:
    """An open lock file and the lock held on it; closing it releases the lock."""

    def __init__(self, fd: int, kind: int) -> None:
        self.fd = fd
        self.kind = kind

    @classmethod
    def try_open(cls, path: Path, kind: int, *, create: bool = False) -> LockFile | None:
        """The file at `path`, locked without waiting; None if it is missing, locked elsewhere, or was
        replaced while we locked it (then whoever held it has moved or removed it)."""
        flags = (os.O_RDONLY if kind == READ else os.O_RDWR) | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            fd = os.open(path, flags, 0o644)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            if try_lock(fd, kind) and same_file(fd, path):
                return cls(fd, kind)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return None

    @classmethod
    def wait_open(cls, path: Path, kind: int) -> LockFile:
        """The file at `path` (created if missing), locked, waiting as long as it takes. Blocking."""
        while True:
            fd = os.open(path, (os.O_RDONLY if kind == READ else os.O_RDWR) | os.O_CLOEXEC | os.O_CREAT, 0o644)
            try:
                wait_lock(fd, kind)
                if same_file(fd, path):
                    return cls(fd, kind)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def change(self, kind: int) -> bool:
        """Change the lock's kind; a write lock becomes a read lock atomically, never unlocked between."""
        if try_lock(self.fd, kind):
            self.kind = kind
            return True
        return False

    def touch(self) -> None:
        """Mark the file as used now: its atime is the entry's last use, which eviction sorts by.
        (Both times, by the kernel's clock: the one that stamped the files it is compared with.)"""
        os.utime(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

