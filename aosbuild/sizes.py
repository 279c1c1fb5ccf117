"""Sizes as people write and read them: the one parser and the one formatter of the package.

A size is a number of bytes with an optional unit, or `unlimited`. The units are osbuild's (`kB`, `KiB`,
`MB`, `MiB`, `GB`, `GiB`, `TB`, `TiB`), `B`, and the one-letter binary units `K`, `M`, `G`, `T` that
`truncate` and `qemu-img` take (so `2G` is 2 GiB). The number may have a fraction (`1.5GiB`).
Every size option (`--cache-max-size`, the drop-in's, `aosbuild store`'s, `sample debian --size`) and
every size shown to a person goes through here, so all accept and print the same.
"""

from __future__ import annotations

import argparse
import re

Bound = int | None  # None: unlimited
UNLIMITED: Bound = None

UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40,
         "kB": 10**3, "KiB": 2**10, "MB": 10**6, "MiB": 2**20, "GB": 10**9, "GiB": 2**30,
         "TB": 10**12, "TiB": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> Bound:
    """Bytes from `20GiB`, `512 MB`, `2G`, `1000`; None for `unlimited`. ValueError says what is accepted."""
    if text.strip() == "unlimited":
        return UNLIMITED
    match = _SIZE.fullmatch(text)
    if match is None or match.group(2) not in UNITS:
        raise ValueError(f"invalid size '{text}': use bytes, a number with one of "
                         f"{', '.join(u for u in UNITS if u)}, or 'unlimited'")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def size_argument(text: str) -> Bound:
    """`parse_size` as an argparse `type`: a bad size is a usage error (exit 2) with the message above."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_size(n: Bound) -> str:
    """`512 B`, `1.5 GiB`; `unlimited` for None."""
    if n is None:
        return "unlimited"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
