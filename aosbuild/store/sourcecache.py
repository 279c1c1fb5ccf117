"""The source items in the store (`sources/<content type>/<checksum>`), bounded apart from the trees.

Items have their own bound (`sources-maximum-size` in cache.info) and are pruned least recently used
first; a build marks the items it used when it ends. Stages see items through hard links, so an item a
running stage reads keeps its bytes even if it is pruned; what pruning must not do is remove an item
between a build finding it and linking it. So items are pruned only while no build is running: a build
holds a read lock on `cache.lock` from start to end, and pruning takes the write lock without waiting,
or does not happen (the build that finishes last prunes).
Files whose names start with a dot (partial downloads, per-item locks) belong to whoever fetches items
and are neither counted nor pruned here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True, kw_only=True)
class Item:
    path: Path
    size: int
    last_used: float


def items(sources: Path) -> list[Item]:
    """Every item, least recently used first."""
    found = []
    for content_type in _listdir(sources):
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
        count += 1
        freed += item.size
    return count, freed


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []
