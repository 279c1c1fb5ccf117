"""Sizes in the store: how much a tree takes on disk, the default bounds, bounds in `cache.info`.

Sizes are parsed and printed by `aosbuild.sizes`. Sizes here are what the files take on disk
(`st_blocks`), each inode counted once, so sparse files and hard links are not counted at their apparent size.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..sizes import UNLIMITED, Bound

# The default bound of the trees: 20 GiB, or half the store's filesystem where that is smaller.
# 20 GiB is what osbuild's own callers pass (image-builder, bootc-image-builder): one Debian or Fedora
# image with its build root takes a few GiB, so the trees of the previous build stay while the next one
# is built, and a rebuild after a change reruns only what changed. Half the filesystem leaves room for
# the trees being built, the sources and the exported image on a small disk or a tmpfs.
DEFAULT_MAX = 20 * 2**30
DEFAULT_FRACTION = 0.5
# Sources: 10 GiB, or a quarter of the filesystem. A Debian image's packages are ~0.2-1 GiB, so this
# keeps those of many package sets; items are small and fetched again only when used again.
DEFAULT_SOURCES_MAX = 10 * 2**30
DEFAULT_SOURCES_FRACTION = 0.25


def bound_to_json(n: Bound) -> int | str:
    return "unlimited" if n is None else n


def bound_from_json(value: object) -> Bound:
    if value == "unlimited":
        return UNLIMITED
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"not a size: {value!r}")


def filesystem_size(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def default_max(path: Path) -> int:
    return min(DEFAULT_MAX, int(filesystem_size(path) * DEFAULT_FRACTION))


def default_sources_max(path: Path) -> int:
    return min(DEFAULT_SOURCES_MAX, int(filesystem_size(path) * DEFAULT_SOURCES_FRACTION))


class Usage:
    """A running count of bytes on disk, each inode once: hard links are counted at their first name."""

    def __init__(self) -> None:
        self.total = 0
        self._seen: set[tuple[int, int]] = set()

    def add(self, st: os.stat_result) -> None:
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in self._seen:
                return
            self._seen.add(key)
        self.total += st.st_blocks * 512


def disk_usage(path: Path, *, known: Mapping[str, int] | None = None) -> int:
    """Bytes the files under `path` take on disk, each inode once. Files that vanish meanwhile count 0.

    `known` maps directories under `path` to their size counted already by another walk after their
    last change (a bottom layer's, by `layers.make_plain`): they are not walked again."""
    known = known or {}
    usage = Usage()
    try:
        usage.add(os.lstat(path))
    except FileNotFoundError:
        return 0
    stack = [os.fspath(path)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    if entry.path in known:
                        usage.total += known[entry.path]
                        continue
                    try:
                        usage.add(entry.stat(follow_symlinks=False))
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                    except FileNotFoundError:
                        continue
        except (FileNotFoundError, NotADirectoryError):
            continue
    return usage.total
