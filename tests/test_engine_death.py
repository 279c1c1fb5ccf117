"""An engine SIGKILLed as a stage starts leaves nothing behind: no bwrap, no sandbox process, no mount.

The dangerous moments are the milliseconds around bwrap's start: before bwrap has asked for
PR_SET_PDEATHSIG, an engine's death does not reach it; before the sandbox's init has asked in turn,
bwrap's death does not reach that (first seen in the Dask worker's kill -9 drill). The engine
(tests/enginekill.py) kills itself 0-8 ms after one of its bwraps is about to start, as `aosbuild`'s
command line (main thread) and as `aosbuild worker` runs it (trio in a thread that is not the main one).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from aosbuild import pidns, sandbox

from .enginekill import STAGES
from .leftovers import loops_backed_by, processes_using

REPO = Path(__file__).resolve().parent.parent
# Before the fix (100 kills per mode, one run each): the sandbox's init was left running in 25 (cli) and
# 26 (thread) kills, always bwrap's child as pid 1 of the sandbox's pid namespace, reparented to init
# and blocked for good reading the eventfd on which bwrap tells it to go on (wchan do_wait_intr_irq);
# bwrap itself never; and every kill left the stage's /dev tmpfs mounted on the host. After: none in
# 400 kills. A kill takes 0.25-0.5 s on a loaded machine.
KILLS = int(os.environ.get("AOSBUILD_DRILL_KILLS", "40"))
# a killed engine's sandboxes end at once; the machine may be loaded
GONE_SECONDS = float(os.environ.get("AOSBUILD_DRILL_GONE", "5"))


@pytest.fixture(scope="module")
def engine() -> Iterator[subprocess.Popen[str]]:
    """The drill's engine: aosbuild imported once, a child forked per kill."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.enginekill"], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    yield proc
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.close()
    proc.wait(timeout=30)
    proc.stdout.close()


def describe(pid: int) -> str:
    """What a leftover process is: its command, parent, pids in each namespace, state and wait channel."""
    try:
        proc = Path(f"/proc/{pid}")
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")[:70].decode(errors="replace")
        status = dict(line.split(":\t", 1) for line in (proc / "status").read_text().splitlines() if ":\t" in line)
        wchan = (proc / "wchan").read_text()
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} [{cmdline}] PPid {status.get('PPid')} NSpid {status.get('NSpid')} {status.get('State')} {wchan}"


def host_mounts_under(directory: Path) -> list[str]:
    """Mount points under `directory` in this mount namespace: the host's. (A sandbox's go with its
    processes; another process's copy of the host's, made by its own `unshare --mount`, is that one's.)"""
    points = (line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())
    return [point for point in points if point.startswith(f"{directory}/")]


def left_by(directory: Path) -> list[str]:
    """What the killed build left, once its sandboxes have had GONE_SECONDS to end."""
    deadline = time.monotonic() + GONE_SECONDS
    while (pids := processes_using(directory)) or host_mounts_under(directory):
        if time.monotonic() > deadline:
            return [*map(describe, pids), *(f"mount {point}" for point in host_mounts_under(directory))]
        time.sleep(0.02)  # processes of a killed engine: /proc is the only sign of their end
    return [f"loop {name}" for name in loops_backed_by(directory)]


def clean_up(directory: Path) -> None:
    """A failed kill's leftovers, ended so that the next kill starts clean."""
    for pid in processes_using(directory):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for point in host_mounts_under(directory):
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
    deadline = time.monotonic() + GONE_SECONDS
    while processes_using(directory) and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.mark.parametrize("mode", ["cli", "thread"])
def test_nothing_outlives_an_engine_killed_as_a_stage_starts(engine: subprocess.Popen[str], workdir: Path,
                                                              mode: str) -> None:
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    assert engine.stdin is not None
    assert engine.stdout is not None
    failures: list[str] = []
    killed = 0
    for kill in range(KILLS):
        directory = workdir / f"kill-{kill}-{uuid.uuid4().hex[:12]}"
        directory.mkdir()
        delay_ms = rng.choice([0.0, rng.uniform(0, 2), rng.uniform(0, 8)])
        engine.stdin.write(f"{mode} {directory} {rng.randint(1, STAGES)} {delay_ms:.3f}\n")
        engine.stdin.flush()
        ended = engine.stdout.readline().strip()
        assert ended, "the drill's engine died"
        killed += ended == f"killed {signal.SIGKILL}"
        if left := left_by(directory):
            failures.append(f"kill {kill} ({delay_ms:.2f} ms, {ended}): {'; '.join(left)}")
            clean_up(directory)
    assert killed > KILLS // 2, f"only {killed} of {KILLS} builds were killed"
    assert failures == [], f"seed {seed}: {len(failures)} of {KILLS} kills left something:\n" + "\n".join(failures)


def test_the_namespace_s_init_takes_its_sandboxes_with_it_and_is_made_again() -> None:
    """What the drill relies on, seen directly: SIGKILL the namespace's init (as an engine's death does)
    and a running sandbox ends at once; the next sandbox gets a new namespace."""
    argv = ["bwrap", "--die-with-parent", "--unshare-pid", "--ro-bind", "/", "/", "--dev", "/dev",
            "--proc", "/proc", "sleep", "60"]

    async def main() -> tuple[int, float, int]:
        namespace = await pidns.namespace()
        started = time.monotonic()
        with anyio.fail_after(30):
            returncode = await sandbox.run_bwrap(argv, on_line=lambda line: None, env={"PATH": "/usr/bin:/bin"},
                                                 on_started=lambda: os.kill(namespace.init, signal.SIGKILL))
        ended = time.monotonic() - started
        with anyio.fail_after(10):
            # its init goes once the kernel has reaped its namespace's last process: no event says when
            while namespace.alive():  # noqa: ASYNC110
                await anyio.sleep(0.01)
        again = await sandbox.run_bwrap(["bwrap", "--ro-bind", "/", "/", "true"], on_line=lambda line: None,
                                        env={"PATH": "/usr/bin:/bin"})
        assert (await pidns.namespace()) is not namespace
        return returncode, ended, again

    returncode, ended, again = anyio.run(main, backend="trio")
    assert returncode == -signal.SIGKILL
    assert ended < 10  # not sleep's 60 s
    assert again == 0
