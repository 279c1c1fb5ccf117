"""Cancel drills: whatever moment a cancel hits a build, no process of it outlives aosbuild.

A failing pipeline cancels siblings whose sandboxes are still being set up; `--stage-timeout` expires
while bwrap is still setting up; aosbuild is killed with SIGKILL while a host `cp` copies a tree. Every
process of a run is found by pid: its command line names the run's private directory, its environment
carries the run's marker, or it sees a bind of a tree under that directory. The last is what finds the
leak the sibling drill is about: a sandbox whose bwrap parent was killed during setup goes on, with
ppid 1, into the runner and the stage, whose command line and (the sandbox's own) environment name
nothing of the run, while it holds the binds of a staging tree.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path

from .conftest import Aosbuild, manifest, pipeline, stage

RUNS = 25  # per drill; two drills: 50 runs in all


def processes_of(workdir: Path, marker: str) -> list[int]:
    """Pids whose command line names `workdir` or whose environment holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (str(workdir).encode() in (entry / "cmdline").read_bytes()
                    or marker.encode() in (entry / "environ").read_bytes()
                    or in_sandbox_of(entry, workdir)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def in_sandbox_of(proc: Path, workdir: Path) -> bool:
    """Whether the process sees a bind of a tree under `workdir`: a sandbox of the run, whose command line
    (the runner, the stage) and environment (the sandbox's own) name nothing of the run. A bind's source
    shows as the root of its mount (mountinfo's fourth field), relative to the filesystem it is on."""
    name = workdir.name
    return any(name in line.split()[3] for line in (proc / "mountinfo").read_text().splitlines())


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_marked(aosbuild: Aosbuild, m: dict[str, object], *args: str) -> tuple[int, str]:
    marker = f"aosbuild-cancel-drill-{uuid.uuid4().hex}"
    env = {**os.environ, "AOSBUILD_DRILL_MARKER": marker}
    proc = subprocess.run(aosbuild.command(m, *args), capture_output=True, text=True, timeout=60,
                          cwd=aosbuild.workdir, env=env)
    left = processes_of(aosbuild.workdir, marker)
    kill_all(left)  # only so that one failure does not spoil the next runs; the test fails anyway
    assert left == [], f"processes left behind: {left}\n{proc.stderr}"
    return proc.returncode, proc.stderr


def siblings_starting(rng: random.Random) -> dict[str, object]:
    """One pipeline fails after a few quick stages while its siblings start one quick stage after another.

    The stages carry a fresh nonce, so that no run resumes from what the previous ones stored.
    """
    nonce = uuid.uuid4().hex
    def quick(name: str, count: int) -> list[dict[str, object]]:
        return [stage("org.aosbuild.test.sleep", seconds=0, marker=f"{nonce}-{name}-{j}") for j in range(count)]

    fail = pipeline("fail", *quick("fail", rng.randrange(4)), stage("org.aosbuild.test.fail", exit=3))
    siblings = [pipeline(f"sibling{i}", *quick(f"sibling{i}", 8 - i), stage("org.aosbuild.test.sleep", seconds=300))
                for i in range(3)]
    return manifest(fail, *siblings)


def test_failing_pipeline_cancels_starting_siblings(aosbuild: Aosbuild) -> None:
    rng = random.Random(8)
    for _ in range(RUNS):
        returncode, stderr = run_marked(aosbuild, siblings_starting(rng), "--jobs", "4")
        assert returncode == 1, stderr


def test_stage_timeout_during_sandbox_setup(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("slow", stage("org.aosbuild.test.sleep", seconds=300)))
    rng = random.Random(11)
    for _ in range(RUNS):
        timeout = rng.uniform(0.001, 0.05)
        returncode, stderr = run_marked(aosbuild, m, "--stage-timeout", f"{timeout:.4f}")
        assert returncode == 1, stderr
        assert "--stage-timeout" in stderr, stderr


def is_cp(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"cp\0")
    except OSError:
        return False


def test_kill_during_export_copy_kills_cp(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("tree", stage("org.aosbuild.test.files", seed="many", count=60000, size=0)))
    built = aosbuild(m)
    assert built.returncode == 0, built.stderr
    marker = f"aosbuild-cancel-drill-{uuid.uuid4().hex}"
    env = {**os.environ, "AOSBUILD_DRILL_MARKER": marker}
    proc = subprocess.Popen(aosbuild.command(m, "--export", "tree", "--output-directory", str(aosbuild.output)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=aosbuild.workdir, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (copying := [pid for pid in processes_of(aosbuild.workdir, marker) if is_cp(pid)]):
            assert proc.poll() is None, "the export ended before its cp was seen"
            assert time.monotonic() < deadline, "no cp started"
        proc.kill()
        proc.wait()
        # PR_SET_PDEATHSIG: the copy is killed with aosbuild, long before it could have finished
        deadline = time.monotonic() + 0.5
        while (left := processes_of(aosbuild.workdir, marker)) and time.monotonic() < deadline:
            pass
        assert left == [], f"left running: {left} (was copying: {copying})"
    finally:
        proc.kill()
        proc.wait()
        kill_all(processes_of(aosbuild.workdir, marker))
