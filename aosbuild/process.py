"""Every subprocess aosbuild starts goes through here.

Output is streamed line by line to a callback; on cancellation the process gets SIGTERM, a grace period,
then SIGKILL, and is always waited for under a shielded scope, so no process outlives the engine's
interest in it. Processes start in their own session: a Ctrl-C on the terminal reaches only the engine,
which then stops them in order.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import anyio

from .errors import AosbuildError

GRACE_SECONDS = 5.0

Argv = Sequence[str | os.PathLike[str]]
# starts a process (the callable given) somewhere of its own, holding that place while the block runs
StartIn = Callable[[Callable[[], "subprocess.Popen[bytes]"]], AbstractAsyncContextManager["subprocess.Popen[bytes]"]]


def argv_list(argv: Argv) -> list[str]:
    return [os.fspath(a) for a in argv]


def explain_status(returncode: int) -> str:
    """Say in words why a process ended: a signal, a missing command, or its exit status."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    if returncode == 127:
        return "exited with status 127 (command not found)"
    if returncode == 126:
        return "exited with status 126 (command not executable)"
    return f"exited with status {returncode}"


class Process:
    """A child process started from the calling (event loop) thread, awaited through a pidfd.

    Why not `anyio.open_process`: on trio it forks from a worker thread, and bwrap's `--die-with-parent`
    (PR_SET_PDEATHSIG) fires when that *thread* exits, which trio's thread cache does after 10 s idle.
    Forking from the event loop's thread ties the sandbox's life to the engine's, as intended.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pidfd = os.pidfd_open(popen.pid)

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    async def wait(self) -> int:
        """Wait for the process to end, then kill what is left of its process group, then reap it.

        Until it is reaped the process's id stays taken, so its process group cannot be another's yet:
        whatever it started and left behind (a bwrap child still setting up, which missed
        `--die-with-parent` because its parent died first) is killed by that id and nothing else.
        """
        if self.popen.returncode is None:
            await anyio.wait_readable(self.pidfd)  # readable once the process has exited, before reaping
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self.popen.wait()

    async def read_output(self, on_chunk: Callable[[bytes], None]) -> None:
        """Pass every chunk of the merged stdout/stderr to `on_chunk` until end of file."""
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        os.set_blocking(fd, False)
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                await anyio.wait_readable(fd)
                continue
            if not chunk:
                return
            on_chunk(chunk)

    def signal(self, signum: int) -> None:
        if self.popen.returncode is None:
            # not popen.send_signal: it would reap an exited process, and wait() kills its group first
            try:
                os.kill(self.popen.pid, signum)
            except ProcessLookupError:
                pass

    def kill_children(self) -> None:
        """SIGKILL the process's own children now, while it still lives to be their parent.

        For bwrap that child is the sandbox's init: killing it takes the whole pid namespace down at once.
        It is not left to `--die-with-parent`, which a child misses when bwrap dies before the child has
        asked for it (seen under load: the stage then ran on, holding the output pipe). Each child is
        signalled through a pidfd opened and then checked to be this process's child, so a recycled pid
        is never hit.
        """
        if self.popen.returncode is not None:
            return
        try:
            listed = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children").read_text().split()
        except OSError:
            return  # exited already: whatever it left is in its process group, which wait() kills
        for pid in map(int, listed):
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue  # gone already
            try:
                if parent_of(pid) == self.popen.pid:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(pidfd)

    def close(self) -> None:
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        os.close(self.pidfd)


async def stop(process: Process, grace: float = GRACE_SECONDS) -> None:
    """SIGTERM, wait up to `grace`, SIGKILL; always waits, shielded from cancellation."""
    with anyio.CancelScope(shield=True):
        if process.returncode is None:
            process.signal(signal.SIGTERM)
            with anyio.move_on_after(grace):
                await process.wait()
            if process.returncode is None:
                process.signal(signal.SIGKILL)
                await process.wait()


def parent_of(pid: int) -> int:
    """The parent pid of a process, from /proc/PID/stat (its fourth field, after the command in brackets)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


async def kill(process: Process) -> None:
    """SIGKILL its children, then its process group, at once; always waits, shielded from cancellation.

    For a sandbox, whose stage has no use for a grace period: the sandbox ends with its init either way.
    The children go first, so that none is left without a parent to take it down with it; the group
    signal then takes the process and any child still in its group, atomically with respect to forks.
    """
    with anyio.CancelScope(shield=True):
        if process.returncode is None:
            process.kill_children()
            try:
                os.killpg(process.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await process.wait()


# Characters per line event: a record stays under 64 KiB even when JSON escapes every character (6x).
MAX_LINE = 8 * 1024


class LineSplitter:
    """Turns chunks of bytes into text lines of at most MAX_LINE characters; a partial line waits for more.

    The bound keeps memory flat and every monitor record small when a process writes long lines or none.
    """

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self._on_line = on_line

    def _emit(self, line: str) -> None:
        for start in range(0, len(line), MAX_LINE):
            self._on_line(line[start:start + MAX_LINE])

    def feed(self, data: bytes) -> None:
        text = self._partial + self._decoder.decode(data)
        *lines, self._partial = text.split("\n")
        for line in lines:
            self._emit(line + "\n")
        if len(self._partial) > MAX_LINE:
            cut = len(self._partial) - len(self._partial) % MAX_LINE
            self._emit(self._partial[:cut])
            self._partial = self._partial[cut:]

    def close(self) -> None:
        text = self._partial + self._decoder.decode(b"", final=True)
        self._partial = ""
        if text:
            self._on_line(text)


PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> Callable[[], None]:
    """A `preexec_fn` that makes the child die with the engine, even of SIGKILL (as mkosi does).

    It checks the parent after setting the signal: an engine that died in between never sends it.
    """
    prctl = _libc().prctl

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(127)

    return preexec


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


async def run_streaming(argv: Argv, *, on_line: Callable[[str], None], env: Mapping[str, str] | None = None,
                        pass_fds: Sequence[int] = (), cwd: Path | None = None,
                        on_started: Callable[[], None] | None = None, grace: float = GRACE_SECONDS,
                        kill_at_once: bool = False, death_signal: bool = True,
                        start_in: StartIn | None = None) -> int:
    """Run a process with stdin from /dev/null, stdout and stderr merged into `on_line`; its exit status.

    `on_started` runs right after the process exists, e.g. to close descriptors it inherited. When the
    caller stops waiting (a cancel), the process is stopped with `stop`, or with `kill` if `kill_at_once`.
    `death_signal` gives the child SIGKILL when the engine dies (PR_SET_PDEATHSIG, in a `preexec_fn`).
    Without it the child starts with vfork, in 0.2 ms instead of about 10 ms for a fork of the engine and
    Python code run in the child: for commands that see to it themselves (bwrap's `--die-with-parent`),
    and for osbuild's host services, which clean up (unmount, close devices) when the engine's end of
    their socket closes, as a kill of the engine does too; a SIGKILL would stop that. `start_in` starts
    the process elsewhere than in this thread (`mountns`: in a thread with a mount namespace of its own),
    keeping that place until the process has been reaped.
    """
    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # fork from this thread (or start_in's) on purpose: see Process
            argv_list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None, pass_fds=tuple(pass_fds), cwd=cwd,
            start_new_session=True, preexec_fn=die_with_parent(os.getpid()) if death_signal else None)

    if start_in is None:
        return await _run_started(start(), on_line, on_started, grace, kill_at_once)
    async with start_in(start) as popen:
        return await _run_started(popen, on_line, on_started, grace, kill_at_once)


async def _run_started(popen: subprocess.Popen[bytes], on_line: Callable[[str], None],
                       on_started: Callable[[], None] | None, grace: float, kill_at_once: bool) -> int:
    process = Process(popen)
    splitter = LineSplitter(on_line)
    at_end = False
    try:
        if on_started is not None:
            on_started()
        await process.read_output(splitter.feed)
        at_end = True
        splitter.close()
        return await process.wait()
    finally:
        if kill_at_once:
            await kill(process)
        else:
            await stop(process, grace)
        if not at_end:
            await drain(process, grace)
        process.close()


async def drain(process: Process, grace: float) -> None:
    """Wait until nothing holds the output pipe any more: the process's own children are gone too.

    A cancelled bwrap dies at once, but its child (the sandbox's init) dies of `--die-with-parent` a moment
    later and may still be setting up, creating mount points in directories the engine is about to remove.
    """
    with anyio.CancelScope(shield=True), anyio.move_on_after(grace):
        await process.read_output(lambda chunk: None)


class CommandError(AosbuildError):
    """A host command the engine ran itself failed."""

    def __init__(self, argv: Sequence[str], returncode: int, output: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output
        super().__init__(f"{' '.join(self.argv)} {explain_status(returncode)}: {output.strip()[-2000:]}")


async def run(argv: Argv, *, env: Mapping[str, str] | None = None) -> str:
    """Run a host command to completion and return its output; a failure raises CommandError."""
    lines: list[str] = []
    returncode = await run_streaming(argv, on_line=lines.append, env=env)
    output = "".join(lines)
    if returncode != 0:
        raise CommandError(argv_list(argv), returncode, output)
    return output
