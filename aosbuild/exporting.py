"""Exports: a pipeline's tree copied out of the store to `OUTDIR/NAME`, replacing what was there at once.

The copy never writes into anything that was there before. It goes into a fresh directory beside the
target, `OUTDIR/.NAME.tmp-<random>` (made with mkdir, which fails rather than follow or reuse anything
existing, and on the target's filesystem), so symlinks a previous export left (a Debian tree's
`/etc/alternatives/*` point at the host) are never written through, and none of its files stay. When the
copy is complete, one rename swaps it in (`renameat2` with `RENAME_EXCHANGE`; where a filesystem lacks
that, the old target is first renamed aside). If `OUTDIR/NAME` is a symlink, the link is replaced, not
followed. What was there before ends at the temporary name and is removed without following symlinks.
A failed or cancelled export removes its temporary directory and leaves `OUTDIR/NAME` as it was.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from .confine import component
from .errors import UsageError
from .store import copy_tree

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
EMPTY_MODE = 0o755  # an export of a pipeline without stages: an empty directory, as mkdir makes it

Copy = Callable[[Path, Path], Awaitable[None]]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def renameat2(src: Path, dst: Path, flags: int) -> None:
    """rename(2) with flags (Python has no binding); raises OSError as os.rename does."""
    if _libc().renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), os.fspath(src), None, os.fspath(dst))


def remove(path: Path) -> None:
    """Remove a file, a symlink (not what it points at) or a whole directory tree, if it is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)  # fd-based on Linux: never follows a symlink out of the tree
    else:
        os.unlink(path)


def swap_in(fresh: Path, target: Path) -> None:
    """Put the complete directory `fresh` at `target`, whatever `target` was (nothing, a directory, a
    file, a symlink), and remove what was there."""
    for _ in range(3):  # someone else may create or remove `target` between the two tries
        try:
            renameat2(fresh, target, RENAME_NOREPLACE)
            return
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this filesystem takes no rename flags
                raise
            move_aside(fresh, target)
            return
        try:
            renameat2(fresh, target, RENAME_EXCHANGE)
        except FileNotFoundError:
            continue
        remove(fresh)  # the previous export, swapped out
        return
    raise OSError(errno.EBUSY, "keeps changing while it is replaced", os.fspath(target))


def move_aside(fresh: Path, target: Path) -> None:
    """`swap_in` without rename flags: the old target is renamed aside first (for a moment, there is
    nothing at `target`), then removed."""
    aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
    try:
        os.rename(target, aside)  # renames a symlink itself, never what it points at
    except FileNotFoundError:
        pass
    os.rename(fresh, target)
    remove(aside)


def export_target(output_directory: Path, name: str) -> Path:
    """OUTDIR/NAME, NAME being one path component (`confine.component`, as the loader checks pipeline
    names): what is there is replaced as a whole, so a name that is empty, `.`, absolute, climbs out or
    reaches into a subdirectory would replace the output directory, a host directory or a directory
    through a symlink."""
    why = component(name)
    if why:
        raise UsageError(f"cannot export {name!r}: its name {why}; an export is a directory directly inside "
                         f"--output-directory ({output_directory}), named by one path component")
    return output_directory / name


async def export_tree(tree: Path | None, target: Path, *, copy: Copy = copy_tree) -> None:
    """Copy `tree` (None: an empty tree) to `target`, replacing whatever is there only when complete."""
    parent = target.parent
    try:
        await anyio.to_thread.run_sync(functools.partial(parent.mkdir, parents=True, exist_ok=True))
        fresh = Path(await anyio.to_thread.run_sync(
            functools.partial(tempfile.mkdtemp, prefix=f".{target.name}.tmp-", dir=parent)))
    except OSError as exc:
        raise export_error(target, exc) from exc
    try:
        if tree is None:
            await anyio.to_thread.run_sync(os.chmod, fresh, EMPTY_MODE)
        else:
            await copy(tree, fresh)
        await anyio.to_thread.run_sync(swap_in, fresh, target)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(remove, fresh)
        if isinstance(exc, OSError):
            raise export_error(target, exc) from exc
        raise


def export_error(target: Path, exc: OSError) -> UsageError:
    return UsageError(f"cannot export to {target}: {exc.strerror or exc}"
                      f"{f' ({exc.filename})' if exc.filename else ''}; check --output-directory")
