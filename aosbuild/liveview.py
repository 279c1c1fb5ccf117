"""The live view: what a build is doing, redrawn in place on a terminal (the default there).

Finished work scrolls up as one line per stage (built, cached or failed, with its duration); below
it a live region, redrawn at most `FPS` times a second (on events and on the engine's `tick`), shows
each running pipeline, its running stage with the time it has run and the last `TAIL` lines of its
output, the progress of downloads, and the build's progress with an estimate of the time left, from
how long the same stages (or stages of the same type) took in this store before (`history.py`). A
failed stage's last lines are printed in full.

Plain ANSI: each redraw is one write that moves the cursor up over the previous live region and
overwrites it line by line, so nothing flickers; lines are cut to the terminal's width, read again at
every redraw, so a resized terminal (SIGWINCH) is followed.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .monitor import Monitor, PlannedStage, describe_progress, human_seconds, progress_bar, write_all

if TYPE_CHECKING:
    from pathlib import Path

    from .manifest import Pipeline, Source, Stage
    from .results import StageResult
    from .sources import ItemResult, SourceProgress

FPS = 10
TAIL = 3            # output lines of a running stage in the live region
FAILED_TAIL = 20    # output lines of a failed stage, printed in full
BOLD, DIM, RED, GREEN, RESET = "\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[32m", "\x1b[0m"


def printable(text: str) -> str:
    """A line of stage output made safe to draw: no control sequences, tabs as spaces."""
    return "".join(c if c.isprintable() else " " for c in text.replace("\t", "    ").rstrip("\n"))


def fit(line: str, width: int) -> tuple[str, int]:
    """The line cut to `width` visible characters (escape sequences take none), and its visible length."""
    out, visible, i = [], 0, 0
    while i < len(line):
        if line[i] == "\x1b":
            end = i + 1
            while end < len(line) and not line[end].isalpha():
                end += 1
            out.append(line[i:end + 1])
            i = end + 1
            continue
        if visible < width:
            out.append(line[i])
            visible += 1
        i += 1
    return "".join(out) + RESET, visible


@dataclass(slots=True)
class Running:
    """A pipeline being built, and the stage it runs."""

    pipeline: Pipeline
    started: float
    stage: Stage | None = None
    stage_started: float = 0.0
    output: deque[str] = field(default_factory=lambda: deque(maxlen=FAILED_TAIL))
    progress: str = ""


class LiveMonitor(Monitor):
    """Events change the state; a redraw shows it, at most once per `interval`, and at the end."""

    def __init__(self, fd: int, *, interval: float = 1 / FPS) -> None:
        self.fd = fd
        self.interval = interval
        self.started = time.monotonic()
        self.total = 0
        self.done = 0
        self.expected: dict[str, float | None] = {}   # planned stage id -> seconds it took before
        self.finished: set[str] = set()               # planned stage ids that have ended
        self._owner: dict[str, str] = {}              # planned stage id -> its pipeline's name
        self._types: dict[str, str] = {}              # planned stage id -> its type
        self._pipelines: list[str] = []               # names of the pipelines to build, in plan order
        self._ended: set[str] = set()                 # names of the pipelines that have ended
        self.running: dict[str, Running] = {}
        self.sources: dict[str, SourceProgress] = {}
        self._pending: list[str] = []                 # lines to print above the live region
        self._drawn: list[int] = []                   # lengths of the live lines on screen
        self._last_draw = -interval

    # -- drawing

    def _size(self) -> tuple[int, int]:
        try:
            size = os.get_terminal_size(self.fd)
        except OSError:
            return 80, 24
        return max(size.columns, 20), max(size.lines, 5)

    def _print(self, line: str) -> None:
        self._pending.append(line)

    def _draw(self, *, final: bool = False) -> None:
        """Redraw, unless the last redraw was less than `interval` ago: the next event or tick will."""
        now = time.monotonic()
        if not final and now - self._last_draw < self.interval:
            return
        self._last_draw = now
        width, height = self._size()
        out = [self._erase()]
        out += [line + "\x1b[K\n" for line in self._pending]
        self._pending.clear()
        live = [] if final else self._live_lines(width, height)
        cut = [fit(line, width - 1) for line in live]
        out.append("\x1b[K\n".join(text for text, _ in cut) + ("\x1b[K" if cut else "") + "\x1b[J")
        self._drawn = [length for _, length in cut]
        # synchronized update (terminals that know it show the whole frame at once; others ignore it)
        write_all(self.fd, ("\x1b[?2026h" + "".join(out) + "\x1b[?2026l").encode(errors="replace"))

    def _erase(self) -> str:
        """Move the cursor to where the live region drawn last time starts.

        Each live line was cut to the width of its time and ended by a newline of ours, so a terminal
        made narrower since cuts it rather than wrapping it (xterm, tmux, screen, the Linux console): it
        still takes one row. Terminals that rewrap such lines leave a stale fragment once per resize.
        """
        rows = len(self._drawn)
        return "\r" + (f"\x1b[{rows - 1}A" if rows > 1 else "")

    def _live_lines(self, width: int, height: int) -> list[str]:
        now = time.monotonic()
        lines: list[str] = []
        tail = TAIL if len(self.running) * (2 + TAIL) < height - 2 else 0
        for state in self.running.values():
            pipeline = state.pipeline
            line = f"{BOLD}{pipeline.name}{RESET}  {human_seconds(now - state.started)}"
            if state.stage is None:
                lines.append(line + "  starting")
                continue
            index = pipeline.stages.index(state.stage) + 1
            lines.append(line + f"  stage {index}/{len(pipeline.stages)}")
            elapsed = now - state.stage_started
            expected = self.expected.get(state.stage.id)
            before = f"  {DIM}(expected {human_seconds(expected)}){RESET}" if expected is not None else ""
            lines.append(f"  running {human_seconds(elapsed):>7}  {state.stage.type}{before}"
                         + (f"  {state.progress}" if state.progress else ""))
            lines += [f"  {DIM}\u2502 {text}{RESET}" for text in list(state.output)[-tail:]] if tail else []
        waiting = [name for name in self._pipelines if name not in self.running and name not in self._ended]
        if waiting:
            lines.append(f"{DIM}waiting: {', '.join(waiting)}{RESET}")
        for source_type, progress in self.sources.items():
            lines.append(f"source {source_type} {progress_bar(progress)} {describe_progress(progress)}")
        lines.append(self._status_line(now))
        return lines[-(height - 1):]

    def _status_line(self, now: float) -> str:
        planned = len(self.expected)
        stages = f", {len(self.finished)}/{planned} stages" if planned else ""
        line = f"{BOLD}[{self.done}/{self.total}]{RESET} pipelines/sources{stages}, {human_seconds(now - self.started)}"
        left, unknown = self.time_left(now)
        if planned == 0 or (unknown and left == 0):
            return line + ("" if planned == 0 else ", time left not known yet (first build of these stages)")
        # stages running longer than they did before leave nothing by the record: say so, not "0s left"
        text = f", about {human_seconds(left)} left" if left >= 0.5 else ", any moment now by the record"
        if unknown:
            text += f" + {unknown} stage{'s' * (unknown != 1)} never timed"
        return line + text

    def time_left(self, now: float) -> tuple[float, int]:
        """Seconds left by the store's record, and how many remaining stages it has no time for.

        The stages of one pipeline run one after the other, pipelines side by side: the estimate is the
        longest pipeline's rest, or all the rest shared among the pipelines running, if that is longer.
        """
        by_pipeline: dict[str, float] = {}
        unknown = 0
        running = {s.stage.id: now - s.stage_started for s in self.running.values() if s.stage is not None}
        for stage_id, expected in self.expected.items():
            if stage_id in self.finished:
                continue
            if expected is None:
                unknown += 1
                continue
            owner = self._owner.get(stage_id, "")
            by_pipeline[owner] = by_pipeline.get(owner, 0.0) + max(0.0, expected - running.get(stage_id, 0.0))
        if not by_pipeline:
            return 0.0, unknown
        share = sum(by_pipeline.values()) / max(1, len(self.running))
        return max(max(by_pipeline.values()), share), unknown

    # -- events

    def build_planned(self, stages: Sequence[PlannedStage]) -> None:
        self.expected = {p.stage.id: p.expected for p in stages}
        self._owner = {p.stage.id: p.pipeline.name for p in stages}
        self._types = {p.stage.id: p.stage.type for p in stages}
        self._pipelines = list(dict.fromkeys(p.pipeline.name for p in stages))

    def build_started(self, label: str, *, sources: int, pipelines: int) -> None:
        self.started = time.monotonic()
        self.total = sources + pipelines
        planned = len(self.expected)
        if planned or pipelines:
            self._print(f"{BOLD}Building {label}{RESET}: {pipelines} pipeline{'s' * (pipelines != 1)} and "
                        f"{planned} stage{'s' * (planned != 1)} to run")
        else:
            self._print(f"{BOLD}Building {label}{RESET}: nothing to run, the store has it all")
        self._draw()

    def source_progress(self, source: Source, progress: SourceProgress) -> None:
        self.sources[source.type] = progress
        self._draw()

    def source_finished(self, source: Source, results: Sequence[ItemResult], success: bool) -> None:
        self.done += 1
        self.sources.pop(source.type, None)
        fetched = sum(1 for r in results if not r.cached and r.error is None)
        failed = sum(1 for r in results if r.error is not None)
        outcome = (f"{RED}{BOLD}FAILED{RESET} " if not success else f"{GREEN}fetched{RESET}" if fetched
                   else f"{GREEN}cached{RESET} ")
        self._print(f"  {outcome}           source {source.type}: {fetched} downloaded, "
                    f"{len(results) - fetched - failed} cached" + (f", {failed} failed" if failed else ""))
        self._draw()

    def pipeline_started(self, pipeline: Pipeline, *, build_root: str, runner: str) -> None:
        self.running[pipeline.name] = Running(pipeline=pipeline, started=time.monotonic())
        self._draw()

    def pipeline_cached(self, pipeline: Pipeline) -> None:
        self._print(f"  {GREEN}cached{RESET}            pipeline {pipeline.name}, in the store already:")

    def stage_started(self, pipeline: Pipeline, stage: Stage) -> None:
        state = self.running.get(pipeline.name)
        if state is not None:
            state.stage, state.stage_started, state.progress = stage, time.monotonic(), ""
            state.output.clear()
        self._draw()

    def stage_output(self, pipeline: Pipeline, stage: Stage, text: str) -> None:
        state = self.running.get(pipeline.name)
        if state is not None:
            state.output.extend(printable(line) for line in text.splitlines() or [""])
        self._draw()

    def stage_progress(self, pipeline: Pipeline, stage: Stage, done: int, total: int, message: str) -> None:
        state = self.running.get(pipeline.name)
        if state is not None:
            state.progress = f"[{done}/{total}] {printable(message)}".rstrip()
        self._draw()

    def stage_finished(self, pipeline: Pipeline, stage: Stage, result: StageResult) -> None:
        if stage.id in self.expected:  # a cached stage of a resumed pipeline was not planned: not counted
            self.finished.add(stage.id)
        where = f"{pipeline.name} / {stage.type}"
        if result.cached:
            self._print(f"  {GREEN}cached{RESET}  {human_seconds(result.duration):>7}  {where}  {DIM}(as built before)"
                        f"{RESET}")
        elif result.success:
            self._print(f"  {GREEN}built{RESET}   {human_seconds(result.duration):>7}  {where}")
            for other, expected in self.expected.items():  # the first of its type times the others
                if expected is None and self._types.get(other) == stage.type:
                    self.expected[other] = result.duration
        else:
            self._print(f"  {RED}{BOLD}FAILED{RESET}  {human_seconds(result.duration):>7}  {where}: {result.reason}")
            lines = result.output.splitlines()[-FAILED_TAIL:]
            if any(line.strip() for line in lines):
                self._print(f"  last {len(lines)} line{'s' * (len(lines) != 1)} of its output:")
                self._pending += [f"    {printable(line)}" for line in lines]
            else:
                self._print("  it printed nothing before it failed")
        state = self.running.get(pipeline.name)
        if state is not None and state.stage is stage:
            state.stage = None
        self._draw()

    def pipeline_finished(self, pipeline: Pipeline, *, success: bool) -> None:
        state = self.running.pop(pipeline.name, None)
        self._ended.add(pipeline.name)
        if success:
            self.done += 1
            took = "" if state is None else f" in {human_seconds(time.monotonic() - state.started)}"
            self._print(f"  {BOLD}done{RESET}              pipeline {pipeline.name}{took}")
        self._draw()

    def log(self, message: str, pipeline: Pipeline | None = None) -> None:
        prefix = f"{pipeline.name}: " if pipeline is not None else ""
        self._pending += [f"  {prefix}{printable(line)}" for line in message.rstrip("\n").splitlines()]
        self._draw()

    def exported(self, name: str, path: Path, size: int) -> None:
        self._print(f"  {BOLD}exported{RESET}          {name} to {path}")
        self._draw()

    def tick(self) -> None:
        if self.running or self.sources or self._pending:
            self._draw()

    def build_finished(self, label: str, *, success: bool) -> None:
        # the live region goes; what the build made is the CLI's summary, printed next
        self.running.clear()
        self.sources.clear()
        self._draw(final=True)
