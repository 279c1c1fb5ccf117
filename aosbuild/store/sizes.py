"""Sizes: `--cache-max-size` values, how much a tree takes on disk, and the default bounds.

A size is a number of bytes with an optional unit (`kB`, `KiB`, `MB`, `MiB`, `GB`, `GiB`, `TB`, `TiB`,
as osbuild accepts them), or `unlimited`. Sizes are what the files take on disk (`st_blocks`), each
inode counted once, so sparse files and hard links are not counted at their apparent size.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

UNLIMITED = None
Bound = int | None  # None: unlimited

UNITS = {"": 1, "B": 1, "kB": 10**3, "KiB": 2**10, "MB": 10**6, "MiB": 2**20, "GB": 10**9, "GiB": 2**30,
         "TB": 10**12, "TiB": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")

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


def parse_size(text: str) -> Bound:
    """Bytes from `20GiB`, `512 MB`, `1000`; None for `unlimited`. ValueError says what is accepted."""
    if text.strip() == "unlimited":
        return UNLIMITED
    match = _SIZE.fullmatch(text)
    if match is None or match.group(2) not in UNITS:
        raise ValueError(f"'{text}' is not a size: use bytes, a number with one of "
                         f"{', '.join(u for u in UNITS if len(u) > 1)}, or 'unlimited'")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def format_size(n: Bound) -> str:
    """`1.5 GiB`; `unlimited` for None."""
    if n is None:
        return "unlimited"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


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


def disk_usage(path: Path) -> int:
    """Bytes the files under `path` take on disk, each inode once. Files that vanish meanwhile count 0."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(st: os.stat_result) -> None:
        nonlocal total
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in seen:
                return
            seen.add(key)
        total += st.st_blocks * 512

    try:
        add(os.lstat(path))
    except FileNotFoundError:
        return 0
    stack = [os.fspath(path)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    try:
                        add(entry.stat(follow_symlinks=False))
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                    except FileNotFoundError:
                        continue
        except (FileNotFoundError, NotADirectoryError):
            continue
    return total
