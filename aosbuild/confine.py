"""Confinement of the paths and names a manifest gives: a manifest is data, and what it names stays inside.

A manifest path is first checked lexically (`relative_path`, `component`): no NUL, no surrogates, no
`..`, nothing too long, so it cannot name anything outside the directory it is relative to. Where a tree
an earlier pipeline built holds the path, it is checked again after resolving symlinks (`resolve_inside`),
and what the sandbox sees is built from the checked value, never from the manifest's raw string.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

NAME_MAX = 255
PATH_MAX = 4096


def _why_bad_text(value: str) -> str | None:
    if "\0" in value:
        return "contains a NUL character"
    try:
        value.encode()
    except UnicodeEncodeError:
        return "is not valid UTF-8 (contains a lone surrogate)"
    if len(value.encode()) > PATH_MAX:
        return f"is longer than {PATH_MAX} bytes"
    return None


def component(value: str) -> str | None:
    """Why `value` is not one path component (a pipeline name used as an export directory), or None."""
    why = _why_bad_text(value)
    if why:
        return why
    if value in ("", ".", ".."):
        return f"'{value}' is not a usable directory name"
    if "/" in value:
        return "contains '/'"
    if len(value.encode()) > NAME_MAX:
        return f"is longer than {NAME_MAX} bytes"
    return None


def relative_path(value: str) -> tuple[str | None, str | None]:
    """`value` as a normalised path relative to its root (a leading `/` means the root), and why not.

    `..` anywhere is refused rather than normalised away: `link/../x` means something else once `link` is
    a symlink, so only a path that needs no `..` is one whose meaning is the same lexically and resolved.
    """
    why = _why_bad_text(value)
    if why:
        return None, why
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None, "contains '..'"
    if any(len(p.encode()) > NAME_MAX for p in parts):
        return None, f"has a component longer than {NAME_MAX} bytes"
    if not parts:
        return None, "names no file"
    return posixpath.join(*parts), None


def resolve_inside(root: Path, relative: str) -> Path | None:
    """`root/relative` with every symlink resolved, or None when that lands outside `root`."""
    real_root = Path(os.path.realpath(root))
    path = Path(os.path.realpath(real_root / relative))
    return path if path.is_relative_to(real_root) else None
