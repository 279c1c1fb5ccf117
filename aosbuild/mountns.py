"""A stage's mount namespace, made by the engine itself: the layered store's overlays, mounted where only
the stage's bwrap sees them.

Before, every stage of a layered tree started `unshare --mount`, a shell, `xargs umount` and one `mount`
per overlay ahead of bwrap (`layers.namespace_argv`, still used by one-off commands): five programs,
about 5-6 ms of CPU per stage, more than bwrap and the stage's Python together. Now a thread of the
engine unshares its own mount namespace (and with it its working directory, CLONE_FS: nothing else in
the engine sees either), detaches the host mounts the stage does not need, mounts the overlays with
mount(2) and starts bwrap, which inherits that namespace; the namespace goes when bwrap's sandbox does.
Every bwrap starts so, a stage without overlays too (`MountNamespace.bare`): its namespace also holds
the stage's /dev tmpfs (attached from a descriptor: the host never sees it, so no kill of the engine can
leave it mounted) and, as /proc, a procfs of the engine's sandbox pid namespace (`pidns`), which bwrap
needs to find its child's namespaces by the pid it knows.

The thread lives until the process has been reaped: bwrap's `--die-with-parent` (PR_SET_PDEATHSIG)
fires when the thread that started it ends, so its end must be the engine's choice (or the engine's
death), never a pool thread's idle timeout (see `process.Process`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from . import process
from .errors import SandboxError
from .store import layers

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
# The previous stage's sandbox may still be going away (its init dies of --die-with-parent a moment after
# bwrap), holding the overlay whose upper dir is now a lower layer here: with index=on the kernel refuses
# that one (EBUSY, "lowerdir is in-use as upperdir"), so a mount is tried again for up to 5 s.
MOUNT_TRIES = 100
MOUNT_RETRY_SECONDS = 0.05


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


# the new mount API (linux/mount.h); the numbers are the same on every architecture since Linux 5.2
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 428, 429, 430, 431, 432
MOVE_MOUNT_F_EMPTY_PATH = 0x4
OPEN_TREE_CLONE, AT_EMPTY_PATH = 1, 0x1000
AT_FDCWD = -100


def syscall(number: int, *args: object) -> int:
    result: int = _libc().syscall(number, *args)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def move_mount(fd: int, target: str) -> None:
    """Attach the detached mount `fd` (`devices.detached_tmpfs`) at `target` in this thread's mount namespace."""
    try:
        syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH)
    except OSError as exc:
        raise OSError(exc.errno, f"attach a mount on {target}: {exc.strerror}") from None


def attach_copy(fd: int, target: str) -> None:
    """Attach a copy of the detached mount `fd` at `target` (the original stays detached, for the next)."""
    copy = syscall(SYS_OPEN_TREE, fd, b"", OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH)
    try:
        move_mount(copy, target)
    finally:
        os.close(copy)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


@dataclass(frozen=True, slots=True, kw_only=True)
class MountNamespace:
    """The overlays to mount (target and options, paths relative to `base`) after detaching `detach`."""

    base: Path
    mounts: tuple[tuple[str, str], ...]
    # each mount's workdir (None: read-only), whose `incompat/volatile` a failed volatile mount leaves
    # behind: the kernel would refuse every retry with EINVAL ("incompat feature 'volatile'")
    workdirs: tuple[str | None, ...] = ()
    detach: tuple[str, ...]
    # a detached mount to attach here and where (the stage's /dev, which the host then never sees)
    dev: tuple[int, str] | None = None
    # a detached procfs, a copy of which becomes /proc here (that of the engine's sandbox pid namespace)
    proc: int | None = None

    @classmethod
    def bare(cls) -> MountNamespace:
        """A copy of the engine's, with nothing mounted or detached (yet: `dev`, `proc`)."""
        return cls(base=Path("/"), mounts=(), detach=())

    def enter(self, stop: threading.Event) -> None:
        """Make this thread's own mount namespace as planned (call it in a thread of its own); `stop` set
        ends the retries of a busy mount at once."""
        libc = _libc()
        _check(libc.unshare(CLONE_NEWNS), "unshare the mount namespace")
        _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make the mounts private")
        for point in self.detach:  # deepest first; one gone already (below another) is no error
            libc.umount2(os.fsencode(point), MNT_DETACH)
        os.chdir(self.base)  # this thread's own working directory now: the options' paths are relative
        workdirs = self.workdirs or (None,) * len(self.mounts)
        for (target, options), workdir in zip(self.mounts, workdirs, strict=True):
            for attempt in range(MOUNT_TRIES):
                if libc.mount(b"aosbuild", os.fsencode(target), b"overlay", 0, options.encode()) == 0:
                    break
                code = ctypes.get_errno()
                if code != errno.EBUSY or attempt == MOUNT_TRIES - 1 or stop.wait(MOUNT_RETRY_SECONDS):
                    raise OSError(code, f"mount the stage's overlay on {target}: {os.strerror(code)}")
                if workdir is not None:
                    layers.clear_volatile_mark(Path(workdir))
        if self.dev is not None:
            move_mount(*self.dev)
        if self.proc is not None:
            attach_copy(self.proc, "/proc")

    @contextlib.asynccontextmanager
    async def started(self, start: Callable[[], subprocess.Popen[bytes]]) -> AsyncIterator[subprocess.Popen[bytes]]:
        """`start()`'s process, started in this namespace from a thread that lives until the block ends."""
        ready, stop, done = threading.Event(), threading.Event(), threading.Event()
        outcome: list[subprocess.Popen[bytes] | BaseException] = []

        def main() -> None:
            try:
                self.enter(stop)
                if not stop.is_set():
                    outcome.append(start())
            except BaseException as exc:  # handed to the engine's task below
                outcome.append(exc)
            finally:
                ready.set()
            done.wait()

        thread = threading.Thread(target=main, name="aosbuild-mount-namespace", daemon=True)
        thread.start()
        handed = False
        try:
            # mostly a millisecond; a busy mount is retried for up to 5 s, which a cancel stops at once
            await anyio.to_thread.run_sync(ready.wait, abandon_on_cancel=True)
            result = outcome[0]
            if isinstance(result, OSError):
                raise SandboxError(f"cannot make the stage's mount namespace: {result.strerror or result}"
                                   f"{f' ({result.filename})' if result.filename else ''}") from result
            if isinstance(result, BaseException):
                raise result
            handed = True
            yield result
        finally:
            stop.set()
            ready.wait()  # once stopped, at most one mount(2) away
            try:
                if not handed and outcome and isinstance(outcome[0], subprocess.Popen):
                    # started, but the caller was cancelled before it could own it: its children too
                    orphan = process.Process(outcome[0])
                    try:
                        await process.kill(orphan)
                    finally:
                        orphan.close()
            finally:
                done.set()
                thread.join()  # it only returns now: its namespace goes with the sandbox's


def for_overlays(base: Path, overlays: Sequence[layers.Overlay], needed: Sequence[str]) -> MountNamespace | None:
    """The namespace that shows `overlays` (paths relative to `base`) to a command that uses the host's
    `needed` paths, the host's other mounts detached (`layers.foreign`); None without overlays."""
    if not overlays:
        return None
    paths = [os.fspath(base), *needed]
    for overlay in overlays:
        paths += [os.fspath(p) for p in (overlay.target, *overlay.lowers, overlay.empty, overlay.upper,
                                         overlay.work) if p is not None]
    return MountNamespace(base=base, mounts=tuple((os.fspath(o.target), o.options(base)) for o in overlays),
                          workdirs=tuple(None if o.work is None else os.fspath(o.work) for o in overlays),
                          detach=tuple(layers.foreign(layers.mount_points(), paths)))
