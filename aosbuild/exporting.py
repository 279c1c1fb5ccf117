"""Exports: a pipeline's tree copied out of the store to `OUTDIR/NAME`, replacing what was there at once.

The copy never writes into anything that was there before. It goes into a fresh directory beside the
target, `OUTDIR/.NAME.tmp-<random>` (made with mkdir, which fails rather than follow or reuse anything
existing, and on the target's filesystem), so symlinks a previous export left (a Debian tree's
`/etc/alternatives/*` point at the host) are never written through, and none of its files stay. When the
copy is complete, one rename swaps it in (`renameat2` with `RENAME_EXCHANGE`; where a filesystem lacks
that, the old target is first renamed aside). If `OUTDIR/NAME` is a symlink, the link is replaced, not
followed. What was there before ends at the temporary name and is removed without following symlinks.
A failed or cancelled export removes its temporary directory and leaves `OUTDIR/NAME` as it was.
An export of the tree that `OUTDIR/NAME` still holds, untouched since the export that put it there, is
not copied again (`exportmarks`).

An export killed outright (-9, a crash) cannot: it leaves `OUTDIR/.NAME.tmp-*` (or `.NAME.old-*`). The
next export of NAME to that directory removes them, whatever store it uses. An export holds an flock on
its temporary directory while it copies, so only directories that no live export holds are removed; only
real directories whose whole name is of that form are, a symlink is never followed and nothing else in
OUTDIR is touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import re
import shutil
import stat
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from .confine import component
from .errors import UsageError
from .exportmarks import ExportMark
from .store import copy_tree
from .store.locks import same_file

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
    """Remove a file, a symlink (not what it points at) or a whole directory tree, if it is there; what
    another process removes meanwhile (the next export clearing leftovers) is gone already, not an error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        while True:
            try:
                shutil.rmtree(path)  # fd-based on Linux: never follows a symlink out of the tree
                return
            except FileNotFoundError:  # another remover took part of it: go on with what is left
                if not os.path.lexists(path):
                    return
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def leftover_pattern(name: str) -> re.Pattern[str]:
    """The names an export of `name` gives its temporary directories (`make_fresh`, `move_aside`)."""
    return re.compile(rf"\.{re.escape(name)}\.(?:tmp|old)-[0-9a-f]{{32}}")


def make_fresh(parent: Path, name: str) -> tuple[Path, int]:
    """A new empty `parent/.NAME.tmp-<random>` and an open descriptor holding an flock on it: the mark
    that a live export owns it (`remove_leftovers` leaves it alone). mkdir never reuses what exists.

    Between the mkdir and the flock, another export's `remove_leftovers` may take it for a dead one: it
    removes it holding the flock, so the flock here waits, finds the directory gone and starts over.
    """
    while True:
        fresh = parent / f".{name}.tmp-{uuid.uuid4().hex}"
        os.mkdir(fresh, 0o700)
        fd = lock_if_still_there(fresh)
        if fd is not None:
            return fresh, fd


def lock_if_still_there(path: Path) -> int | None:
    """An flock on the directory `path`, waiting for it; None if meanwhile it was removed (or replaced)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if same_file(fd, path):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def remove_leftovers(parent: Path, name: str) -> list[str]:
    """Remove what killed exports of `name` left in `parent`; the names removed. A directory another
    export is filling (its flock is held) stays, as does anything that is not a directory of ours."""
    pattern = leftover_pattern(name)
    removed = []
    for entry in os.scandir(parent):
        if not pattern.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, OSError):
            continue  # gone meanwhile, or replaced by something we do not open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            remove(Path(entry.path))  # holding the flock: see make_fresh
            removed.append(entry.name)
        except BlockingIOError:
            continue  # a live export's
        finally:
            os.close(fd)
    return removed


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


async def export_tree(tree: Path | None, target: Path, *, copy: Copy = copy_tree,
                      mark: ExportMark | None = None) -> bool:
    """Copy `tree` (None: an empty tree) to `target`, replacing whatever is there only when complete.
    With a `mark`, a target that still holds exactly what the same export left is kept (`exportmarks`)
    and False returned; True when copied."""
    parent = target.parent
    try:
        await anyio.to_thread.run_sync(functools.partial(parent.mkdir, parents=True, exist_ok=True))
        await anyio.to_thread.run_sync(remove_leftovers, parent, target.name)
        if mark is not None and await anyio.to_thread.run_sync(mark.holds, target):
            return False
        fresh, lock = await anyio.to_thread.run_sync(make_fresh, parent, target.name)
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
    finally:
        os.close(lock)
    if mark is not None:
        await anyio.to_thread.run_sync(mark.remember, target)
    return True


def export_error(target: Path, exc: OSError) -> UsageError:
    return UsageError(f"cannot export to {target}: {exc.strerror or exc}"
                      f"{f' ({exc.filename})' if exc.filename else ''}; check --output-directory")
