"""The pid namespace every sandbox of the engine starts in: its init dies with the engine, and with it,
by the kernel's hand, everything in the namespace.

bwrap asks for PR_SET_PDEATHSIG itself, early in its main(), and its sandbox's init asks in turn once
bwrap has cloned it. An engine SIGKILLed in the milliseconds before the first leaves bwrap running; a
bwrap that dies before the second (of the engine's death, or of a broken `--info-fd` pipe) leaves the
init blocked for good on the eventfd read that waits for bwrap's word to go on, holding the stage's
namespaces and mounts (tests/test_engine_death.py: about 1 kill in 15 around a stage's start did).
Neither window closes from outside bwrap without a program of ours run before it: a fork of the engine
for a `preexec_fn`, about 10 ms per stage instead of the 0.2 ms of a vfork.

So every bwrap starts in a pid namespace of the engine's own, made once per engine process. Its init
(`INIT`, a few lines of Python) asks for SIGKILL on its parent's death, then checks, through /proc, that
its parent is still the engine (getppid() says 0 to a namespace's pid 1): if the engine died first, it
exits at once. Its parent is a thread that lives as long as the engine process (PR_SET_PDEATHSIG follows
the thread that forked). When the init dies, the kernel kills every process of the namespace, however
far it had got, and no process can be started in it any more. bwrap reads its child's namespaces from
/proc by the pid it knows, the namespace's, so it runs with a procfs of the namespace as /proc, which
the init makes and hands over (`proc`), in a mount namespace of its own (`mountns`). Entering the pid
namespace costs a sandbox's start two setns(2) calls.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import functools
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio

from .errors import SandboxError

CLONE_NEWPID = 0x20000000

# pid 1 of the namespace: dies with its parent, the engine's thread (or exits if that is gone already),
# hands the engine a procfs of the namespace (descriptor 1 is a socket), reaps what is left to it
INIT = """
import ctypes, os, signal, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:
    sys.exit("aosbuild: prctl(PR_SET_PDEATHSIG) failed")
stat = open("/proc/self/stat").read()
if int(stat[stat.rindex(")") + 2:].split()[1]) != int(sys.argv[1]):
    sys.exit(0)
fs = libc.syscall(430, b"proc", 1)
if fs < 0 or libc.syscall(431, fs, 6, None, None, 0) != 0:
    sys.exit("aosbuild: cannot make a procfs: " + os.strerror(ctypes.get_errno()))
proc = libc.syscall(432, fs, 1, 0x2 | 0x4 | 0x8)
if proc < 0:
    sys.exit("aosbuild: cannot mount a procfs: " + os.strerror(ctypes.get_errno()))
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
with socket.socket(fileno=1) as engine:
    socket.send_fds(engine, [b"1"], [proc])
os.close(proc)
os.close(fs)
while True:
    signal.sigwait({signal.SIGCHLD})
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
"""


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc().setns(fd, CLONE_NEWPID) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns(CLONE_NEWPID): {os.strerror(code)}")


class Namespace:
    """One engine's namespace, made by `launch()` in a thread of its own that then waits for the init."""

    def __init__(self) -> None:
        self.fd = -1  # /proc/INIT/ns/pid, for setns(2)
        self.proc = -1  # a procfs of the namespace, mounted nowhere: bwrap's /proc (`mountns`)
        self.init = 0  # its pid
        self.pidfd = -1  # readable once the init has died
        self.error: str | None = None
        self.ended = threading.Event()
        self._ready = threading.Event()

    def launch(self) -> None:
        """Start making it, in the background (`wait_ready` waits for it)."""
        _own()  # opened now: a sandbox's mount namespace, where `entered` ends, has another /proc
        threading.Thread(target=self._main, name="aosbuild-pid-namespace", daemon=True).start()

    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self) -> None:
        self._ready.wait()
        if self.error is not None:
            raise SandboxError(f"cannot make the sandboxes' pid namespace: {self.error}")

    def _main(self) -> None:
        init = None
        try:
            if _libc().unshare(CLONE_NEWPID) != 0:  # for this thread's children only
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWPID)")
            ours, theirs = socket.socketpair()
            with ours:
                with theirs:
                    init = subprocess.Popen([sys.executable, "-I", "-S", "-c", INIT, str(os.getpid())], cwd="/",
                                            stdin=subprocess.DEVNULL, stdout=theirs.fileno(), start_new_session=True)
                _, fds, _, _ = socket.recv_fds(ours, 1, 1)
            if not fds:
                raise OSError(0, f"its init (python3) exited with status {init.wait()}")
            self.proc = fds[0]
            os.set_inheritable(self.proc, False)  # recv_fds gives it without O_CLOEXEC
            self.init = init.pid
            self.pidfd = os.pidfd_open(init.pid)
            self.fd = os.open(f"/proc/{init.pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self.error = exc.strerror or str(exc)
        finally:
            self._ready.set()
        if init is not None:
            init.wait()  # this thread lives as long as the init, whose parent it is
        self.ended.set()

    def alive(self) -> bool:
        """Whether its init lives, or is still being started (a namespace whose init died, or never
        started, takes no process)."""
        if not self.ready():
            return True
        return self.error is None and not self.ended.is_set() and not select.select([self.pidfd], [], [], 0)[0]

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """This thread's children (forked within the block) start in the namespace. A fork fails with
        ENOMEM once its init has died (killed: the engine's death does that): said so here."""
        _setns(self.fd)
        try:
            yield
        except OSError as exc:
            if exc.errno != errno.ENOMEM or self.alive():
                raise
            raise SandboxError("the sandboxes' pid namespace has ended: its init (pid "
                               f"{self.init}) was killed, and its sandboxes with it") from exc
        finally:
            _setns(_own())


@functools.cache
def _own() -> int:
    """The engine's own pid namespace, to return to."""
    return os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)


_lock = threading.Lock()
_current: Namespace | None = None


def _launched() -> Namespace:
    global _current
    with _lock:
        if _current is None or not _current.alive():
            if _current is None:
                atexit.register(_end)
            _current = Namespace()
            _current.launch()
        return _current


def _end() -> None:
    """At the engine's exit, its namespace's end: killed and reaped here, so that not even the init
    outlives the engine's process by the moment its PR_SET_PDEATHSIG takes (the sandboxes are gone)."""
    namespace = _current
    if namespace is not None and namespace.ready() and namespace.error is None:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(namespace.pidfd, signal.SIGKILL)
        namespace.ended.wait(5)


def start_soon() -> None:
    """Begin making the engine's namespace now, in the background (its init's Python takes some 20 ms of
    CPU to start), so that the first sandbox need not wait for it: for when stages are about to run."""
    _launched()


def _ready() -> Namespace:
    namespace = _launched()
    namespace.wait_ready()
    return namespace


async def namespace() -> Namespace:
    """The engine's namespace, made the first time, or again if its init was killed (the sandboxes in it
    died with it)."""
    current = _current
    if current is not None and current.ready() and current.alive():
        return current
    return await anyio.to_thread.run_sync(_ready)


def pid_in_namespace(parent: int, pid: int) -> int | None:
    """The engine's pid of `parent`'s child whose pid in `parent`'s namespace is `pid` (`NSpid`'s second,
    after the engine's); None if it is gone. bwrap's `--info-fd` names its child so."""
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        try:
            status = Path(f"/proc/{child}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:"):
                pids = line.split()[1:]
                if len(pids) > 1 and int(pids[1]) == pid:
                    return int(child)
    return None
