"""Failure drills: signals, stubborn and escaping stages, floods of output, timeouts, hostile options, a full disk.

After each drill the exit code is right, the message says what happened (no traceback), and no process,
mount, loop device or staging entry is left behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import tarfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from .conftest import Aosbuild, Run, check_jsonseq, manifest, pipeline, stage
from .leftovers import loops_backed_by, processes_mentioning, stray_mounts
from .test_devices import SIZE, START, disk_manifest, loopback

# every drill's store is a tmpfs mounted nodev, as /dev/shm is on a stock Debian 12
pytestmark = pytest.mark.usefixtures("nodev_store")

GRACE = 5.0  # aosbuild.process.GRACE_SECONDS: SIGTERM, then this long, then SIGKILL
EXIT_CODES = {int(signal.SIGINT): 130, int(signal.SIGTERM): 143}


def assert_clean(aosbuild: Aosbuild) -> None:
    """Nothing of the build is left: no process, mount, loop device, staging or temporary entry."""
    assert processes_mentioning(str(aosbuild.workdir)) == []
    # the store itself is a tmpfs of the test's (`nodev_store`); nothing may be mounted anywhere below it
    assert [str(m) for m in stray_mounts(aosbuild.workdir)] == []
    assert loops_backed_by(aosbuild.workdir) == []
    for entry in ("stage", "tmp"):
        if (aosbuild.store / entry).exists():
            assert list((aosbuild.store / entry).iterdir()) == []


def assert_explained(run: Run, *words: str) -> None:
    # a failing stage's own output (its traceback too) is quoted indented; aosbuild's would start a line
    assert not any(line.startswith("Traceback") for line in run.stderr.splitlines()), run.stderr
    for word in words:
        assert word in run.stderr, run.stderr


def pids_with_marker(marker: str) -> list[int]:
    return processes_mentioning(marker)


def start(aosbuild: Aosbuild, m: dict[str, object], *args: str) -> subprocess.Popen[bytes]:
    # unbuffered: lines read before communicate() must not take more of the stream with them
    return subprocess.Popen(aosbuild.command(m, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=aosbuild.workdir, bufsize=0)


def finish(proc: subprocess.Popen[bytes], timeout: float) -> Run:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Run(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def wait_for_message(proc: subprocess.Popen[bytes], prefix: str) -> bytes:
    """Read the jsonseq progress stream until a stage prints a line starting with `prefix`."""
    assert proc.stdout is not None
    seen = b""
    while True:
        line = proc.stdout.readline()
        assert line, "the build ended before the stage got there"
        seen += line
        if json.loads(line[1:]).get("message", "").startswith(prefix):
            return seen


# 1. SIGINT and SIGTERM at random moments of a multi-pipeline build with devices and mounts

SEED = 20261123
MOMENTS = 10  # per signal: 20 in all
LATEST = 2.5  # the latest moment, in seconds after the build's first record
HANG = LATEST + 3  # the hanging stage alone outlasts every moment, by a margin for a loaded machine


def hanging_loop_stage(hang: float = HANG) -> dict[str, object]:
    return {"type": "org.aosbuild.test.loop", "options": {"filename": "disk.img", "text": "x", "hang": hang},
            "devices": {"disk": loopback(start=START, size=SIZE)},
            "mounts": [{"name": "root", "type": "org.osbuild.ext4", "source": "disk", "target": "/"}]}


def random_moments() -> list[tuple[int, float]]:
    rng = random.Random(SEED)
    return [(signum, round(rng.uniform(0.0, LATEST), 3))
            for signum in (int(signal.SIGINT), int(signal.SIGTERM)) for _ in range(MOMENTS)]


def build_end(stdout: str) -> str | None:
    """How the stream says the build ended: "finished successfully", "failed", or None (it does not)."""
    for message in (json.loads(r).get("message") or "" for r in stdout.split("\x1e") if r.strip()):
        for end in ("finished successfully", "failed"):
            if message.startswith("manifest ") and message.endswith(f" {end}\n"):
                return end
    return None


@pytest.mark.parametrize(("signum", "delay"), random_moments())
def test_signal_at_a_random_moment(aosbuild: Aosbuild, signum: int, delay: float) -> None:
    """Every moment falls while the build runs (its hanging stage alone takes longer than the latest):
    the build is aborted with the signal's exit code, reports no end, and leaves nothing."""
    m = disk_manifest(hanging_loop_stage())
    m["pipelines"].append(pipeline("side", stage("org.osbuild.mkdir", paths=[{"path": "/x"}]),
                                   stage("org.aosbuild.test.sleep", seconds=1)))
    proc = start(aosbuild, m, "--monitor", "jsonseq")
    assert proc.stdout is not None
    # from the build's first record on; a signal before it is test_signal_during_startup's drill
    first = proc.stdout.readline()
    time.sleep(delay)
    assert proc.poll() is None, "the build ended before its moment"
    proc.send_signal(signum)
    run = finish(proc, timeout=60)
    run.stdout = first.decode() + run.stdout
    check_jsonseq(run.stdout)
    assert run.returncode == EXIT_CODES[signum], run.stderr
    assert_explained(run, "Aborted")
    assert build_end(run.stdout) == "failed"
    assert_clean(aosbuild)


def wait_for_entry_point(proc: subprocess.Popen[bytes]) -> None:
    """Until aosbuild's first instruction has run: it catches SIGTERM from there on (SigCgt in /proc).

    Before that the interpreter itself is starting (site, the import system): a signal there ends any
    Python program with a traceback, which is not aosbuild's to handle.
    """
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.005)
    raise AssertionError("aosbuild never reached its entry point")


@pytest.mark.parametrize("signum", [int(signal.SIGINT), int(signal.SIGTERM)])
@pytest.mark.parametrize("delay", [0.0, 0.1, 0.3])
def test_signal_during_startup(aosbuild: Aosbuild, signum: int, delay: float) -> None:
    proc = start(aosbuild, disk_manifest(hanging_loop_stage()), "--monitor", "jsonseq")
    wait_for_entry_point(proc)
    time.sleep(delay)  # the heavy imports and the manifest's loading take longer than this
    proc.send_signal(signum)
    run = finish(proc, timeout=60)
    assert_clean(aosbuild)
    assert run.returncode == EXIT_CODES[signum], run.stderr
    assert_explained(run, "Aborted")


# 2. a stage that ignores SIGTERM

def test_stage_ignoring_sigterm_is_killed(aosbuild: Aosbuild) -> None:
    marker = f"aosbuild-drill-stubborn-{uuid.uuid4().hex}"
    m = manifest(pipeline("stubborn", stage("org.aosbuild.test.ignore-term", seconds=300, marker=marker)))
    proc = start(aosbuild, m, "--monitor", "jsonseq")
    try:
        wait_for_message(proc, "ignoring SIGTERM")
        deadline = time.monotonic() + 10
        while not pids_with_marker(marker):  # the stage execs itself with the marker on its command line
            assert time.monotonic() < deadline, "the stage never showed its marker"
            time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        run = finish(proc, timeout=GRACE + 30)
        took = time.monotonic() - sent
        assert run.returncode == 130, run.stderr
        assert_explained(run, "Aborted")
        assert took < GRACE + 10, f"aosbuild took {took:.1f}s to stop"
        assert pids_with_marker(marker) == []
        assert_clean(aosbuild)
    finally:
        for pid in pids_with_marker(marker):
            os.kill(pid, signal.SIGKILL)


# 3. a stage that forks a daemon to outlive it

def test_daemon_does_not_outlive_its_stage(aosbuild: Aosbuild) -> None:
    marker = f"aosbuild-drill-daemon-{uuid.uuid4().hex}"
    m = manifest(pipeline("tree", stage("org.aosbuild.test.daemon", marker=marker, seconds=300)))
    try:
        run = aosbuild(m, "--export", "tree", "--output-directory", str(aosbuild.output), timeout=120)
        assert run.returncode == 0, run.stderr
        assert (aosbuild.output / "tree" / "daemon.pid").read_text().strip().isdigit()
        assert pids_with_marker(marker) == []
        assert_clean(aosbuild)
    finally:
        for pid in pids_with_marker(marker):
            os.kill(pid, signal.SIGKILL)


# 4. a stage that writes 100 MB of output

HUNDRED_MB = 100 * 1000 * 1000
RSS_LIMIT_KB = 300 * 1024


def peak_rss_while_running(proc: subprocess.Popen[bytes]) -> tuple[Run, int]:
    """Run to the end, polling the aosbuild process's VmHWM (its peak resident set) meanwhile."""
    peak = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal peak
        status = Path(f"/proc/{proc.pid}/status")
        while not stop.is_set():
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
            except OSError:
                return
            stop.wait(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        run = finish(proc, timeout=240)
    finally:
        stop.set()
        poller.join()
    return run, peak


@pytest.mark.parametrize(("line", "exit_code"), [
    pytest.param(0, 0, id="no-newlines"),
    pytest.param(0, 3, id="no-newlines-failing"),
    pytest.param(1000, 3, id="short-lines-failing"),
    pytest.param(100_000, 0, id="long-lines"),
])
def test_flood_of_output_stays_bounded(aosbuild: Aosbuild, line: int, exit_code: int) -> None:
    m = manifest(pipeline("loud", stage("org.aosbuild.test.output", bytes=HUNDRED_MB, line=line,
                                        exit=exit_code)))
    run, peak = peak_rss_while_running(start(aosbuild, m, "--monitor", "jsonseq"))
    assert run.returncode == (1 if exit_code else 0), run.stderr[-2000:]
    assert peak < RSS_LIMIT_KB, f"aosbuild's peak RSS was {peak // 1024} MiB"
    assert len(run.stderr) < 1 << 20
    check_jsonseq(run.stdout)
    assert max(len(record) for record in run.stdout.split("\x1e")) < 64 * 1024
    if exit_code:
        assert_explained(run, "org.aosbuild.test.output")
    assert_clean(aosbuild)


def test_flood_of_output_in_the_json_result(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("loud", stage("org.aosbuild.test.output", bytes=HUNDRED_MB, line=0, exit=3)))
    run, peak = peak_rss_while_running(start(aosbuild, m, "--json"))
    assert run.returncode == 1, run.stderr[-2000:]
    assert peak < RSS_LIMIT_KB, f"aosbuild's peak RSS was {peak // 1024} MiB"
    assert len(run.stdout) < 4 << 20, f"the --json document is {len(run.stdout)} bytes"
    result = json.loads(run.stdout)
    assert result["success"] is False
    assert_clean(aosbuild)


# 5. a stage that exceeds --stage-timeout

def test_stage_timeout(aosbuild: Aosbuild) -> None:
    m = manifest(pipeline("slow", stage("org.aosbuild.test.sleep", seconds=300)))
    began = time.monotonic()
    run = aosbuild(m, "--stage-timeout", "2", timeout=120)
    assert run.returncode == 1, run.stderr
    assert time.monotonic() - began < 2 + GRACE + 20
    assert_explained(run, "timed out", "--stage-timeout")
    assert_clean(aosbuild)


# 6. stage options that try to escape the tree

ESCAPES = {
    "mkdir-tree-url": stage("org.osbuild.mkdir", paths=[{"path": "tree:///../../{name}", "parents": True}]),
    "mkdir-relative": stage("org.osbuild.mkdir", paths=[{"path": "../{name}"}]),
    "mkdir-inner": stage("org.osbuild.mkdir", paths=[{"path": "/etc/../../{name}"}]),
    "truncate": stage("org.osbuild.truncate", filename="../../{name}", size="1M"),
    "truncate-absolute": stage("org.osbuild.truncate", filename="/../../../../../../../../{name}", size="1M"),
    "copy": stage("org.osbuild.copy", paths=[{"from": "tree:///etc", "to": "tree:///../../{name}"}]),
    "copy-from": stage("org.osbuild.copy", paths=[{"from": "tree:///../../../../../etc/hostname",
                                                   "to": "tree:///{name}"}]),
}


def found_anywhere(aosbuild: Aosbuild, name: str) -> list[Path]:
    places = [aosbuild.workdir, aosbuild.workdir.parent, Path("/"), Path("/tmp"), Path("/run")]
    return [p for place in places for p in place.glob(name)] + list(aosbuild.workdir.rglob(name))


@pytest.mark.parametrize("escape", list(ESCAPES))
def test_options_cannot_escape_the_tree(aosbuild: Aosbuild, escape: str) -> None:
    name = f"aosbuild-drill-escape-{uuid.uuid4().hex}"
    escaping = json.loads(json.dumps(ESCAPES[escape]).replace("{name}", name))
    m = manifest(pipeline("tree", stage("org.osbuild.mkdir", paths=[{"path": "/etc"}]), escaping))
    run = aosbuild(m, timeout=120)
    # refused by the schema (2) or by the stage (1); never written
    assert run.returncode in (1, 2), run.stderr
    if run.returncode == 1:
        assert_explained(run, "escapes its root")
    else:  # validation errors go to standard output, as osbuild prints them
        assert "is not valid" in run.stdout, run.stdout
        assert "Traceback" not in run.stdout + run.stderr
    assert found_anywhere(aosbuild, name) == []
    assert_clean(aosbuild)


def test_tar_keeps_an_absolute_symlink_as_a_symlink(aosbuild: Aosbuild) -> None:
    secret = aosbuild.workdir / "host-secret"
    secret.write_text("host secret\n")
    tree_input = {"type": "org.osbuild.tree", "origin": "org.osbuild.pipeline", "references": ["name:tree"]}
    m = manifest(
        pipeline("tree", stage("org.osbuild.mkdir", paths=[{"path": "/etc"}]),
                 stage("org.osbuild.ln", paths=[
                     {"target": str(secret), "link_name": "tree:///etc/secret", "symbolic": True},
                     {"target": "/etc/hostname", "link_name": "tree:///etc/hostname-link", "symbolic": True},
                     {"target": "/", "link_name": "tree:///root-link", "symbolic": True}])),
        pipeline("archive", {"type": "org.osbuild.tar", "inputs": {"tree": tree_input},
                             "options": {"filename": "tree.tar"}}))
    run = aosbuild(m, "--export", "archive", "--output-directory", str(aosbuild.output), timeout=120)
    assert run.returncode == 0, run.stderr
    with tarfile.open(aosbuild.output / "archive" / "tree.tar") as tar:
        members = {member.name: member for member in tar.getmembers()}
        assert members["./etc/secret"].issym()
        assert members["./etc/secret"].linkname == str(secret)
        assert members["./etc/hostname-link"].issym()
        assert members["./root-link"].issym()
        assert members["./root-link"].linkname == "/"
        # nothing from behind the links came in: only the tree's own entries
        assert sorted(members) == [".", "./etc", "./etc/hostname-link", "./etc/secret", "./root-link"]
    assert secret.read_text() == "host secret\n"
    assert_clean(aosbuild)


# 7. a store on a small tmpfs that fills up

@pytest.fixture
def small_store(nodev_store: Aosbuild) -> Aosbuild:
    """The store's tmpfs (`nodev_store`'s, which unmounts it) shrunk to 20 MiB."""
    subprocess.run(["mount", "-o", "remount,size=20m", str(nodev_store.store)], check=True)
    return nodev_store


def test_store_fills_up(small_store: Aosbuild) -> None:
    aosbuild = small_store
    run = aosbuild(manifest(pipeline("big", stage("org.aosbuild.test.fill", megabytes=50))), timeout=120)
    assert run.returncode == 1, run.stderr
    assert_explained(run, "No space left on device")
    assert_clean(aosbuild)
    # the store still works: a small build on it succeeds and nothing is staged afterwards
    run = aosbuild(manifest(pipeline("small", stage("org.aosbuild.test.fill", megabytes=1))),
                   "--export", "small", "--output-directory", str(aosbuild.output), timeout=120)
    assert run.returncode == 0, run.stderr
    assert (aosbuild.output / "small" / "fill").stat().st_size == 1 << 20
    assert_clean(aosbuild)


def test_a_layer_the_store_cannot_keep_never_fails_the_build(small_store: Aosbuild) -> None:
    """Layers are never copied: a full-ish store does not stop a build. A layer larger than the store's
    bound (half of its 20 MiB filesystem) is not stored and the build goes on with it, and the layers above
    it are not stored either (they would be a miss without it); a --checkpoint of it says so."""
    aosbuild = small_store
    m = manifest(pipeline("big", stage("org.aosbuild.test.fill", megabytes=12),
                          stage("org.aosbuild.test.files", seed="last")))
    run = aosbuild(m, "--export", "big", "--output-directory", str(aosbuild.output), timeout=120)
    assert run.returncode == 0, run.stderr
    assert "warning" not in run.stdout, run.stdout
    assert "is not stored: a layer below it is not stored either" in run.stdout
    assert (aosbuild.output / "big" / "fill").stat().st_size == 12 << 20
    assert (aosbuild.output / "big" / "last-0").is_file()
    assert os.listdir(aosbuild.store / "objects") == []
    assert_clean(aosbuild)

    asked = aosbuild(m, "--checkpoint", "org.aosbuild.test.fill", timeout=120)
    assert asked.returncode == 0, asked.stderr
    assert "is larger than the cache bound" in asked.stdout
    assert_clean(aosbuild)
