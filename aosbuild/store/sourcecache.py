"""The source items in the store (`sources/<content type>/<checksum>`), bounded apart from the trees.

Items have their own bound (`sources-maximum-size` in cache.info) and are pruned least recently used
first; a build marks the items it used when it ends. Stages see items through hard links, so an item a
running stage reads keeps its bytes even if it is pruned; what pruning must not do is remove an item
between a build finding it and linking it. So items are pruned only while no build is running: a build
holds a read lock on `cache.lock` from start to end, and pruning takes the write lock without waiting,
or does not happen (the build that finishes last prunes).
Files whose names start with a dot (partial downloads, per-item locks) belong to whoever fetches items
and are neither counted nor pruned here.

An item is verified when it enters the store, and its size, modification time and inode are recorded
then in `sources/.verified/<content type>/<checksum>`; before an item is used, `check` compares them
(cheap), and hashes the item again only when they differ, when there is no record, or when asked to
(`--sources-only`, `aosbuild store verify`). Items are hard-linked into stages, so a stage writing into
one changes its modification time too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..checksum import PARTIAL_PREFIX, checksum_of, split_checksum
from .locks import same_file

RECORDS = ".verified"


@dataclass(frozen=True, slots=True, kw_only=True)
class Item:
    path: Path
    size: int
    last_used: float


def items(sources: Path) -> list[Item]:
    """Every item, least recently used first."""
    found = []
    for content_type in _listdir(sources):
        if content_type.startswith("."):
            continue  # the records, not a content type
        directory = sources / content_type
        for name in _listdir(directory):
            if name.startswith("."):
                continue
            path = directory / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            found.append(Item(path=path, size=st.st_blocks * 512, last_used=st.st_atime))
    found.sort(key=lambda i: i.last_used)
    return found


def touch(paths: Iterable[Path]) -> None:
    """Mark items as used now."""
    now = time.time_ns()
    for path in paths:
        try:
            st = os.lstat(path)
            os.utime(path, ns=(now, st.st_mtime_ns), follow_symlinks=False)
        except OSError:
            continue


def prune(sources: Path, to: int) -> tuple[int, int]:
    """Remove least recently used items until they take at most `to` bytes; (items, bytes) removed.
    The caller holds the store's `cache.lock` for writing, so no build is using any item."""
    found = items(sources)
    used = sum(i.size for i in found)
    count = freed = 0
    for item in found:
        if used - freed <= to:
            break
        try:
            os.unlink(item.path)
        except FileNotFoundError:
            continue
        forget(item.path)
        count += 1
        freed += item.size
    return count, freed


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def record_path(item: Path) -> Path:
    """Where the record of `sources/<type>/<checksum>` is kept."""
    return item.parent.parent / RECORDS / item.parent.name / item.name


def _fingerprint(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _read_record(item: Path) -> dict[str, int] | None:
    try:
        record = json.loads(record_path(item).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def record(item: Path) -> None:
    """Remember the item as it is now, verified. The caller holds the item's lock."""
    path = record_path(item)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(PARTIAL_PREFIX + path.name)
    partial.write_text(json.dumps(_fingerprint(os.stat(item))))
    os.rename(partial, path)


def forget(item: Path) -> None:
    """Remove the record of an item that is gone."""
    try:
        os.unlink(record_path(item))
    except FileNotFoundError:
        pass


def recorded(item: Path) -> bool:
    """Whether the item is there as it was when it was verified (its size, modification time, inode)."""
    try:
        st = os.stat(item)
    except OSError:
        return False
    return _read_record(item) == _fingerprint(st)


def check(item: Path, checksum: str, *, full: bool = False) -> str | None:
    """What is wrong with the item named `checksum`, or None if it is good (and then recorded as good).

    Hashes it only if its record is missing or differs from it, or with `full`. FileNotFoundError if the
    item is not there; ValueError for a checksum of an unknown algorithm. The caller holds the item's lock.
    """
    algorithm, _ = split_checksum(checksum)
    st = os.stat(item)
    known = _read_record(item)
    if known is not None and known.get("size") != st.st_size:
        return f"its size is {st.st_size} bytes, {known.get('size')} when it was verified"
    if known == _fingerprint(st) and not full:
        return None
    actual = checksum_of(item, algorithm)
    if actual != checksum:
        return f"its bytes have the checksum {actual}"
    if known != _fingerprint(st):
        record(item)
    return None


def discard(item: Path) -> None:
    """Remove a damaged item and its record. The caller holds the item's lock."""
    try:
        os.unlink(item)
    except FileNotFoundError:
        pass
    forget(item)


def take_lock(item: Path) -> int | None:
    """One try at the item's lock, `.lock-<checksum>` beside it: the locked descriptor, or None if another
    process holds it.

    The lock is an exclusive flock on that file, held while one process fetches, checks or removes the item.
    The holder removes the file before releasing it (`release_lock`); a process that then wins the lock
    of the removed file does not hold the item's lock (it tries again on a fresh file), so two holders
    never overlap and no lock files are left behind.
    """
    path = item.with_name(f".lock-{item.name}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if same_file(fd, path):
            return fd
    except BlockingIOError:
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def release_lock(item: Path, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(item.with_name(f".lock-{item.name}"))
    os.close(fd)


@contextlib.contextmanager
def try_lock(item: Path) -> Iterator[bool]:
    """The item's lock without waiting: True if held (until the block ends)."""
    fd = take_lock(item)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            release_lock(item, fd)
