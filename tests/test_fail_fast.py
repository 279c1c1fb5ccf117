"""Failing fast: from a stage's failure to aosbuild's exit, with sibling pipelines cancelled, 0.5 s at most.

Every run, under load (a CPU burner the test starts), one pipeline fails after a few quick stages while
its siblings are starting stages, sleeping in one, or holding a loop device. The failing stage prints the
wall-clock time it fails at; the run's time is from then to the moment `aosbuild` has exited. Nothing of
the build may be left afterwards: no process, no mount below the run's directory, no loop device.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import Aosbuild, manifest, pipeline, stage
from .leftovers import loops_backed_by, mounts_under
from .test_cancel_drills import kill_all, processes_of

RUNS = 20
BOUND_SECONDS = 0.5


@pytest.fixture
def cpu_burner() -> Iterator[None]:
    """One process spinning on a CPU for the test's duration: the machine is loaded, as CI machines are."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        burner.kill()
        burner.wait()


def failing_with_siblings(run: int) -> dict[str, Any]:
    """A pipeline that fails after 0-2 quick stages; siblings start stages, sleep, or hold a loop device.

    A fresh nonce per run: no run resumes from what an earlier one stored.
    """
    nonce = uuid.uuid4().hex

    def quick(name: str, count: int) -> list[dict[str, Any]]:
        return [stage("org.aosbuild.test.sleep", seconds=0, marker=f"{nonce}-{name}-{j}") for j in range(count)]

    fail = pipeline("fail", *quick("fail", run % 3),
                    stage("org.aosbuild.test.fail", stamp=True, exit=3, lines=0))
    starting = [pipeline(f"starting{i}", *quick(f"starting{i}", 3 - i),
                         stage("org.aosbuild.test.sleep", seconds=300, marker=nonce)) for i in range(2)]
    looping = pipeline("loop", stage("org.aosbuild.test.fill", megabytes=1, filename="disk.img"),
                       stage("org.aosbuild.test.loop", filename="disk.img", text=nonce, hang=300))
    return manifest(fail, *starting, looping)


def test_failure_to_exit_is_fast_every_time(aosbuild: Aosbuild, cpu_burner: None) -> None:
    seconds: list[float] = []
    for run in range(RUNS):
        marker = f"aosbuild-fail-fast-{uuid.uuid4().hex}"
        proc = subprocess.run(aosbuild.command(failing_with_siblings(run), "--jobs", "4"), capture_output=True,
                              text=True, timeout=60, cwd=aosbuild.workdir,
                              env={**os.environ, "AOSBUILD_DRILL_MARKER": marker})
        exited = time.time()
        left = processes_of(aosbuild.workdir, marker)
        kill_all(left)  # only so that one failure does not spoil the next runs; the test fails anyway
        assert left == [], f"run {run}: processes left behind: {left}\n{proc.stderr}"
        assert mounts_under(aosbuild.workdir) == [], f"run {run}"
        assert loops_backed_by(aosbuild.workdir) == [], f"run {run}"
        assert proc.returncode == 1, proc.stderr
        found = re.search(r"failing at (\d+\.\d+)", proc.stdout + proc.stderr)
        assert found, proc.stdout + proc.stderr
        seconds.append(exited - float(found.group(1)))
    slow = [f"run {i}: {s:.3f} s" for i, s in enumerate(seconds) if s > BOUND_SECONDS]
    assert slow == [], f"failure to exit above {BOUND_SECONDS} s: {slow}; all: {[round(s, 3) for s in seconds]}"
