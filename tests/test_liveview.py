"""The live view in a real terminal: tmux runs the command, the test reads the screen at several moments.

Each test has a tmux server of its own (`tmux -S <its directory>/tmux.socket`), killed by that socket
at the end.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aosbuild.liveview import LiveMonitor, fit
from aosbuild.monitor import PlannedStage, human_seconds

from .conftest import Aosbuild, manifest, pipeline, stage
from .test_monitor import result_of, two_pipelines

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")


class Terminal:
    """A 120x40 tmux pane running bash, on a tmux server of its own."""

    def __init__(self, cwd: Path) -> None:
        self.socket = cwd / "tmux.socket"  # its own server, gone with the test's directory
        self.cwd = cwd

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", str(self.socket), *args], check=True, capture_output=True,
                              text=True, timeout=30).stdout

    def start(self) -> None:
        self.tmux("new-session", "-d", "-s", "lv", "-x", "120", "-y", "40", "-c", str(self.cwd),
                  "env", "-u", "TMUX", "TERM=tmux-256color", "bash", "--norc", "--noprofile")

    def run(self, argv: list[str]) -> None:
        self.tmux("send-keys", "-t", "lv", "clear; " + shlex.join(argv) + "; echo EXIT=$?", "Enter")

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "lv")

    def wait_for(self, check: Callable[[str], bool], what: str, timeout: float = 60) -> str:
        """The first screen for which `check` holds, read every 0.1 s."""
        deadline = time.monotonic() + timeout
        screen = self.screen()
        while not check(screen):
            if time.monotonic() > deadline:
                raise AssertionError(f"the screen never showed {what}:\n{screen}")
            time.sleep(0.1)  # polling another process's screen: there is nothing to wait on
            screen = self.screen()
        return screen

    def close(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def terminal(workdir: Path) -> Iterator[Terminal]:
    term = Terminal(workdir)
    term.start()
    try:
        yield term
    finally:
        term.close()


def sleeping(first: float, second: float) -> dict[str, object]:
    return manifest(pipeline("base", stage("org.osbuild.mkdir", paths=[{"path": "/etc"}]),
                             stage("org.aosbuild.test.sleep", seconds=first, marker="a"),
                             stage("org.aosbuild.test.sleep", seconds=second, marker="b")))


def finished(screen: str) -> bool:
    return re.search(r"^EXIT=\d+$", screen, re.MULTILINE) is not None  # not the typed command's echo


RUNNING = re.compile(r"running +(\d+\.\d+)s +org\.aosbuild\.test\.sleep")


def test_live_view_shows_running_stages_folds_finished_ones_and_estimates_a_rebuild(
        aosbuild: Aosbuild, terminal: Terminal) -> None:
    args = ("--export", "base", "--output-directory", str(aosbuild.output))
    terminal.run(aosbuild.command(sleeping(2.0, 1.0), *args))

    # a running stage with its elapsed time, which goes up between two captures
    screen = terminal.wait_for(lambda s: RUNNING.search(s) is not None and "sleeping 2.0" in s,
                               "a running stage and its output")
    first = float(RUNNING.search(screen).group(1))  # type: ignore[union-attr]
    assert re.search(r"built +\d+\.\d+s +base / org\.osbuild\.mkdir", screen), screen  # folded, one line
    assert "sleeping 2.0" in screen  # the running stage's last lines of output
    later = terminal.wait_for(lambda s: (m := RUNNING.search(s)) is not None and float(m.group(1)) > first,
                              "the elapsed time going up")
    assert "base  " in later
    assert "stage 2/3" in later

    screen = terminal.wait_for(finished, "the end of the build")
    assert re.search(r"^EXIT=0$", screen, re.MULTILINE)
    assert len(re.findall(r"built +\d+\.\d+s +base / ", screen)) == 3, screen
    assert not RUNNING.search(screen), screen  # the live region is gone at the end
    # the summary: the export's path and size, what was built, the wall time, where to look next
    assert re.search(rf"{re.escape(str(aosbuild.output / 'base'))} +\d+ B", screen), screen
    assert re.search(r"built in \d+\.\d+s: 3 stages built, 0 cached", screen), screen
    assert f"aosbuild report --last --store {aosbuild.store}" in screen

    # a rebuild with the sleeps changed: the store knows how long this type of stage takes
    terminal.run(aosbuild.command(sleeping(2.1, 1.1), *args))
    screen = terminal.wait_for(lambda s: RUNNING.search(s) is not None and "left" in s, "an estimate")
    assert re.search(r"about \d+\.\d+s left", screen), screen
    assert "(expected " in screen  # the running stage says how long it took before
    screen = terminal.wait_for(finished, "the end of the rebuild")
    assert re.search(r"^EXIT=0$", screen, re.MULTILINE)
    # every stage is a layer in the store: the unchanged first stage is taken from it, the other two run
    assert re.search(r"built in \d+\.\d+s: 2 stages built, 1 cached", screen), screen


def test_live_view_follows_the_terminal_width(aosbuild: Aosbuild, terminal: Terminal) -> None:
    slow = manifest(pipeline("base", stage("org.aosbuild.test.sleep", seconds=3.0, marker="a")))
    terminal.run(aosbuild.command(slow))
    terminal.wait_for(lambda s: RUNNING.search(s) is not None, "a running stage")
    terminal.tmux("resize-window", "-t", "lv", "-x", "60")

    def status_line_cut(screen: str) -> bool:
        last = [line for line in screen.splitlines() if line.strip()][-1]
        # the status line, redrawn for 60 columns: cut to 59, not wrapped onto a second row
        return last.startswith("[0/1] pipelines/sources") and len(last) <= 59 and RUNNING.search(screen) is not None

    terminal.wait_for(status_line_cut, "the live region redrawn for 60 columns")
    assert re.search(r"^EXIT=0$", terminal.wait_for(finished, "the end of the build"), re.MULTILINE)


def test_live_view_shows_the_failed_stage_output_in_full(aosbuild: Aosbuild, terminal: Terminal) -> None:
    failing = manifest(pipeline("base", stage("org.osbuild.mkdir", paths=[{"path": "/etc"}]),
                                stage("org.aosbuild.test.fail", lines=25)))
    terminal.run(aosbuild.command(failing))
    screen = terminal.wait_for(finished, "the failure")
    assert re.search(r"^EXIT=1$", screen, re.MULTILINE)
    assert re.search(r"FAILED +\d+\.\d+s +base / org\.aosbuild\.test\.fail: exited with status 1", screen), screen
    assert "last 20 lines of its output:" in screen
    assert "line 24 of the failing stage" in screen
    assert "line 5 of the failing stage" in screen
    assert "failed after" in screen  # the summary


def test_log_monitor_on_a_terminal_keeps_osbuilds_layout(aosbuild: Aosbuild, terminal: Terminal) -> None:
    quick = manifest(pipeline("base", stage("org.osbuild.mkdir", paths=[{"path": "/etc"}])))
    terminal.run(aosbuild.command(quick, "--monitor", "log"))
    screen = terminal.wait_for(finished, "the end of the build")
    assert re.search(r"^EXIT=0$", screen, re.MULTILINE)
    assert "Pipeline base: " in screen
    assert "Build\n  root: <host>" in screen
    assert "\u23f1  Duration: " in screen
    assert "Building " not in screen  # not the live view
    # and the summary on stderr, which osbuild's clients do not parse
    assert "built in" in screen
    assert "aosbuild report --last" in screen


# -- the drawing itself, without a terminal


def test_fit_cuts_visible_characters_and_keeps_escapes() -> None:
    text, length = fit("\x1b[1mbold\x1b[0m and more", 6)
    assert length == 6
    assert text.startswith("\x1b[1mbold\x1b[0m a")


def test_seconds_format() -> None:
    assert [human_seconds(v) for v in (0.123, 12.34, 125, 3725)] == ["0.12s", "12.3s", "2m05s", "1h02m"]


def test_redraw_moves_up_over_the_previous_live_region(tmp_path: Path) -> None:
    path = tmp_path / "out"
    a, b = two_pipelines()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        monitor = LiveMonitor(fd, interval=0)  # every event redraws
        monitor.build_planned([PlannedStage(pipeline=a, stage=a.stages[0], expected=4.0),
                               PlannedStage(pipeline=b, stage=b.stages[0], expected=None)])
        monitor.build_started("m.json", sources=0, pipelines=2)  # live: waiting a, b; status
        monitor.pipeline_started(a, build_root="<host>", runner="r")  # live: a; waiting b; status
        monitor.stage_started(a, a.stages[0])  # live: a, its stage; waiting b; status
        monitor.tick()
        monitor.build_finished("m.json", success=True)
    finally:
        os.close(fd)
    frames = [re.sub(r"\x1b\[[0-9;]*m", "", f.removesuffix("\x1b[?2026l"))  # colours off
              for f in path.read_bytes().decode().split("\x1b[?2026h")[1:]]
    assert len(frames) == 5
    assert not frames[0].startswith("\r\x1b[")  # nothing drawn before
    assert "waiting: a, b" in frames[0]
    assert "Building m.json: 2 pipelines and 2 stages to run" in frames[0]
    assert "about 4.00s left + 1 stage" in frames[0]  # cut at 80 columns
    assert frames[1].startswith("\r\x1b[1A")  # two live lines before: up one, to the first
    assert "waiting: b" in frames[1]
    assert frames[2].startswith("\r\x1b[2A")  # three before
    assert frames[3].startswith("\r\x1b[3A")  # four before
    assert "running" in frames[3]
    assert frames[4].startswith("\r\x1b[3A")
    assert "running" not in frames[4]
    assert frames[4].endswith("\x1b[J")  # what was below is cleared


def test_a_resumed_pipelines_cached_stages_are_not_counted_as_planned_ones(tmp_path: Path) -> None:
    """A rebuild showed "19/15 stages": the stages a resumed pipeline took from the store are reported as
    cached but were never planned; only planned stages count."""
    a, b = two_pipelines()  # a: taken from the store (cached), b: planned and built
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        monitor = LiveMonitor(fd, interval=0)
        monitor.build_planned([PlannedStage(pipeline=b, stage=b.stages[0], expected=1.0)])
        monitor.build_started("m.json", sources=0, pipelines=2)
        for p in (a, b):
            monitor.pipeline_started(p, build_root="<host>", runner="r")
            result = dataclasses.replace(result_of(p), cached=p is a)
            monitor.stage_finished(p, p.stages[0], result)
        assert ", 1/1 stages" in monitor._status_line(time.monotonic())
    finally:
        os.close(fd)


def test_a_failed_stage_that_printed_nothing_says_so(tmp_path: Path) -> None:
    a, _ = two_pipelines()
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        monitor = LiveMonitor(fd, interval=0)
        monitor.build_started("m.json", sources=0, pipelines=1)
        monitor.pipeline_started(a, build_root="<host>", runner="r")
        failed = dataclasses.replace(result_of(a, output="\n"), success=False, reason="exited with status 1")
        monitor.stage_finished(a, a.stages[0], failed)
        monitor.build_finished("m.json", success=False)
    finally:
        os.close(fd)
    text = (tmp_path / "out").read_text()
    assert "it printed nothing before it failed" in text
    assert "of its output:" not in text
