"""A stage's mount namespace made in a thread of the engine: the overlays only its process sees."""

from __future__ import annotations

import functools
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import anyio
import pytest

from aosbuild import process
from aosbuild.errors import SandboxError
from aosbuild.mountns import MountNamespace, for_overlays
from aosbuild.store import layers


def related_pairwise(point: str, needed: list[str]) -> bool:
    """`layers.foreign`'s rule, spelt out pair by pair: a mount point is kept if it is `/`, a needed
    path, above one or inside one."""
    wanted = [p.rstrip("/") or "/" for p in (*needed, *layers.ALWAYS_NEEDED)]
    return point == "/" or any(n == point or n.startswith(point + "/") or point.startswith(n + "/")
                               for n in wanted)


def test_foreign_mounts_are_those_neither_above_nor_inside_a_needed_path() -> None:
    rnd = random.Random(14)
    names = ["a", "b", "ab", "a.b", "c"]

    def path() -> str:
        return "/" + "/".join(rnd.choice(names) for _ in range(rnd.randint(1, 4)))

    for _ in range(5000):
        points = [*(path() for _ in range(8)), "/", "/proc", "/sys/fs/cgroup", "/dev/shm"]
        needed = [path() + rnd.choice(["", "/"]) for _ in range(3)]
        expected = {p for p in points if not related_pairwise(p, needed)}
        found = layers.foreign(points, needed)
        assert set(found) == expected, (points, needed)
        assert [len(p) for p in found] == sorted((len(p) for p in found), reverse=True)  # deepest first


def namespace_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "aosbuild-mount-namespace"]


async def test_the_overlays_are_mounted_for_the_process_only(workdir: Path) -> None:
    lower, upper, work, target, empty = (workdir / name for name in ("lower", "upper", "work", "target", "empty"))
    for d in (lower, upper, work, target, empty):
        d.mkdir()
    (lower / "from-below").write_text("lower\n")
    overlay = layers.Overlay(target=target, lowers=(lower,), empty=empty, upper=upper, work=work)
    namespace = for_overlays(workdir, [overlay], [os.fspath(workdir)])
    assert namespace is not None
    assert for_overlays(workdir, [], []) is None
    lines: list[str] = []
    script = f"cat {target}/from-below && echo made > {target}/new && grep -c ' {target} ' /proc/self/mountinfo"
    code = await process.run_streaming(["sh", "-c", script], on_line=lines.append, start_in=namespace.started)
    assert (code, lines) == (0, ["lower\n", "1\n"])
    assert os.listdir(target) == []  # never mounted here
    assert (upper / "new").read_text() == "made\n"  # the process wrote through the overlay
    assert os.getcwd() != os.fspath(workdir)  # the thread's working directory was its own
    assert namespace_threads() == []  # the thread ends with the process


async def test_a_failed_mount_is_an_error_and_starts_nothing(workdir: Path) -> None:
    namespace = MountNamespace(base=workdir, mounts=((os.fspath(workdir / "missing"), "lowerdir=nowhere"),),
                               detach=())
    started: list[int] = []

    def start() -> subprocess.Popen[bytes]:
        started.append(1)
        return subprocess.Popen(["true"])

    with pytest.raises(SandboxError, match=r"mount namespace: mount the stage's overlay on .*missing"):
        async with namespace.started(start):
            pass
    assert started == []
    assert namespace_threads() == []


def holding_and_busy(workdir: Path) -> tuple[MountNamespace, MountNamespace]:
    """Two namespaces: one holding an overlay, one whose overlay's lower is the first one's upper (busy
    while the first is mounted, with index=on)."""
    for name in ("lower", "upper", "work", "a", "b", "empty", "upper2", "work2"):
        (workdir / name).mkdir()
    holder = layers.Overlay(target=workdir / "a", lowers=(workdir / "lower",), empty=workdir / "empty",
                            upper=workdir / "upper", work=workdir / "work")
    busy = layers.Overlay(target=workdir / "b", lowers=(workdir / "upper",), empty=workdir / "empty",
                          upper=workdir / "upper2", work=workdir / "work2")
    holding = for_overlays(workdir, [holder], [os.fspath(workdir)])
    waiting = for_overlays(workdir, [busy], [os.fspath(workdir)])
    assert holding is not None
    assert waiting is not None
    return holding, waiting


async def test_a_cancel_stops_the_retries_of_a_busy_mount_at_once(workdir: Path) -> None:
    """A mount whose lower layer is still another sandbox's upper (index=on: EBUSY) is retried for
    up to 5 s; the build failing meanwhile (a cancel) must not wait for that."""
    holding, waiting = holding_and_busy(workdir)
    lines: list[str] = []
    holds = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(process.run_streaming, ["sleep", "30"], on_line=lines.append,
                                        start_in=holding.started, kill_at_once=True, on_started=holds.set))
        await holds.wait()
        started = time.monotonic()
        with anyio.move_on_after(0.3) as scope:
            await process.run_streaming(["true"], on_line=lines.append, start_in=waiting.started)
        assert scope.cancelled_caught  # the mount was busy: still retrying when cancelled
        assert time.monotonic() - started < 1.0
        tg.cancel_scope.cancel()
    assert namespace_threads() == []


async def test_a_busy_volatile_mount_succeeds_once_its_lower_is_free(workdir: Path) -> None:
    """The retry of a mount whose lower was busy must succeed once it is free: a failed volatile mount
    leaves a mark in its workdir that makes the kernel refuse every later try (EINVAL) unless cleared."""
    holding, waiting = holding_and_busy(workdir)
    assert "volatile" in ",".join(options for _target, options in waiting.mounts)
    lines: list[str] = []
    holds = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(process.run_streaming, ["sleep", "0.5"], on_line=lines.append,
                                        start_in=holding.started, on_started=holds.set))
        await holds.wait()
        with anyio.fail_after(5):
            await process.run_streaming(["true"], on_line=lines.append, start_in=waiting.started)
    assert namespace_threads() == []
