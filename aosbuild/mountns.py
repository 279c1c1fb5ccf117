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

A namespace with a `late` tree starts its process before the tree is there: its mount point is a
read-only bind of itself, shared, so that the overlay the thread mounts on it later (`LateTree.attach`,
once the stage below has been committed) appears in the sandbox too, whose bind of it bwrap made a slave
of it. Until then a stage that writes there fails (EROFS) rather than writing where nothing is kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import queue
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
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
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


def _mount_overlay(target: str, options: str, workdir: str | None, stop: threading.Event, flags: int = 0) -> None:
    """mount(2) an overlay, trying a busy one again (see MOUNT_TRIES) until `stop` is set."""
    libc = _libc()
    for attempt in range(MOUNT_TRIES):
        if libc.mount(b"aosbuild", os.fsencode(target), b"overlay", flags, options.encode()) == 0:
            return
        code = ctypes.get_errno()
        if code != errno.EBUSY or attempt == MOUNT_TRIES - 1 or stop.wait(MOUNT_RETRY_SECONDS):
            raise OSError(code, f"mount the stage's overlay on {target}: {os.strerror(code)}")
        if workdir is not None:
            layers.clear_volatile_mark(Path(workdir))


class LateTree:
    """A stage's tree mounted after its sandbox has started (see the module's docstring): `attach` runs
    the mount in the namespace's thread, which is the only place where it can be made."""

    def __init__(self, target: Path) -> None:
        self.target = os.fspath(target)
        self._requests: queue.SimpleQueue[Callable[[], None] | None] | None = None
        self._stop: threading.Event | None = None
        self._started = anyio.Event()  # the namespace's thread takes requests (or is gone)
        self.attached = False

    def prepare(self) -> None:
        """In the namespace's thread, before the process starts: the read-only, shared mount point."""
        libc = _libc()
        target = os.fsencode(self.target)
        _check(libc.mount(target, target, None, MS_BIND, None), f"bind {self.target} on itself")
        _check(libc.mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None),
               f"make {self.target} read-only until the tree is there")
        _check(libc.mount(None, target, None, MS_SHARED, None), f"share {self.target} with the sandbox")

    async def attach(self, options: str, workdir: str | None, before: Callable[[], None] = lambda: None) -> None:
        """Mount the tree's overlay (options relative to the namespace's base) where the sandbox sees it,
        with the flags bwrap gives its binds (nosuid, nodev), once the namespace is there; `before` runs
        first, in the same thread (file work that must precede the mount). The thread wakes this task
        itself through an eventfd when it is done: no worker thread waits for it, and the thread never
        waits for the event loop (which may be joining it)."""
        await self._started.wait()
        if self._requests is None or self._stop is None:
            raise SandboxError(f"cannot attach the stage's tree at {self.target}: its namespace is gone")
        stop = self._stop
        failed: list[Exception] = []
        done = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        users, lock = [2], threading.Lock()  # the thread and this task: the last one done closes it

        def release() -> None:
            with lock:
                users[0] -= 1
                if users[0] == 0:
                    os.close(done)

        def mount() -> None:
            try:
                before()
                _mount_overlay(self.target, options, workdir, stop, MS_NOSUID | MS_NODEV)
            except Exception as exc:  # handed to the task, as in `started`
                failed.append(exc)
            finally:
                os.eventfd_write(done, 1)
                release()

        self._requests.put(mount)
        try:
            await anyio.wait_readable(done)
        finally:
            release()
        if failed and isinstance(failed[0], OSError):
            raise SandboxError(f"cannot attach the stage's tree: {failed[0].strerror or failed[0]}") from failed[0]
        if failed:
            raise failed[0]
        self.attached = True


@dataclass(frozen=True, slots=True, kw_only=True)
class MountNamespace:
    """The overlays to mount (target and options, paths relative to `base`) after detaching `detach`."""

    base: Path
    mounts: tuple[tuple[str, str], ...]
    # each mount's workdir (None: read-only), whose `incompat/volatile` a failed volatile mount leaves
    # behind: the kernel would refuse every retry with EINVAL ("incompat feature 'volatile'")
    workdirs: tuple[str | None, ...] = ()
    detach: tuple[str, ...]
    late: LateTree | None = None  # the tree, mounted once the process has started
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
            _mount_overlay(target, options, workdir, stop)
        if self.late is not None:
            self.late.prepare()
        if self.dev is not None:
            move_mount(*self.dev)
        if self.proc is not None:
            attach_copy(self.proc, "/proc")

    @contextlib.asynccontextmanager
    async def started(self, start: Callable[[], subprocess.Popen[bytes]]) -> AsyncIterator[subprocess.Popen[bytes]]:
        """`start()`'s process, started in this namespace from a thread that lives until the block ends."""
        ready, stop = threading.Event(), threading.Event()
        requests: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
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
            while (request := requests.get()) is not None:  # `LateTree.attach`, until the block ends
                request()

        if self.late is not None:
            self.late._requests, self.late._stop = requests, stop
        thread = threading.Thread(target=main, name="aosbuild-mount-namespace", daemon=True)
        thread.start()
        if self.late is not None:
            self.late._started.set()
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
            if self.late is not None:
                self.late._requests = None
                self.late._started.set()
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
                requests.put(None)
                thread.join()  # it only returns now: its namespace goes with the sandbox's


def for_overlays(base: Path, overlays: Sequence[layers.Overlay], needed: Sequence[str],
                 late: LateTree | None = None) -> MountNamespace | None:
    """The namespace that shows `overlays` (paths relative to `base`) to a command that uses the host's
    `needed` paths, the host's other mounts detached (`layers.foreign`); None without overlays or a `late`
    tree (whose layers are below `base`)."""
    if not overlays and late is None:
        return None
    paths = [os.fspath(base), *needed]
    for overlay in overlays:
        paths += [os.fspath(p) for p in (overlay.target, *overlay.lowers, overlay.empty, overlay.upper,
                                         overlay.work) if p is not None]
    return MountNamespace(base=base, mounts=tuple((os.fspath(o.target), o.options(base)) for o in overlays),
                          workdirs=tuple(None if o.work is None else os.fspath(o.work) for o in overlays),
                          detach=tuple(layers.foreign(layers.mount_points(), paths)), late=late)
