"""Monitors turn the engine's events into progress for people (`log`) and programs (`jsonseq`).

The engine calls the methods of `Monitor`; the base class ignores every event and is the `null`
monitor. Events of pipelines that run at the same time arrive interleaved, so every event names its
pipeline and stage, and no monitor keeps a notion of "the current stage".
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .ids import context_id
from .sizes import format_size

if TYPE_CHECKING:
    from pathlib import Path

    from .manifest import Pipeline, Source, Stage
    from .results import StageResult
    from .sources import ItemResult, SourceProgress

OUTPUT_LIMIT = 31000  # osbuild's cap on a result's output, to keep records under 64 KiB


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Monitor:
    """Receives the engine's events; this base class ignores them all (the null monitor)."""

    def build_started(self, label: str, *, sources: int, pipelines: int) -> None: ...
    def source_started(self, source: Source) -> None: ...
    def source_log(self, source: Source, message: str) -> None: ...
    def source_progress(self, source: Source, progress: SourceProgress) -> None: ...
    def source_finished(self, source: Source, results: Sequence[ItemResult], success: bool) -> None: ...
    def pipeline_started(self, pipeline: Pipeline, *, build_root: str, runner: str) -> None: ...
    def stage_started(self, pipeline: Pipeline, stage: Stage) -> None: ...
    def stage_output(self, pipeline: Pipeline, stage: Stage, text: str) -> None: ...
    def stage_progress(self, pipeline: Pipeline, stage: Stage, done: int, total: int, message: str) -> None: ...
    def stage_finished(self, pipeline: Pipeline, stage: Stage, result: StageResult) -> None: ...
    def pipeline_finished(self, pipeline: Pipeline, *, success: bool) -> None: ...
    def pipeline_cached(self, pipeline: Pipeline) -> None: ...
    def log(self, message: str, pipeline: Pipeline | None = None) -> None: ...
    def build_finished(self, label: str, *, success: bool) -> None: ...
    # aosbuild's own events, which osbuild's layouts have no place for (the log and jsonseq monitors ignore them)
    def build_planned(self, stages: Sequence[PlannedStage]) -> None: ...
    def exported(self, name: str, path: Path, size: int) -> None: ...
    def worker_log(self, worker: str, message: str, pipeline: Pipeline | None = None) -> None:
        """A line about a dispatched pipeline from the Dask worker that built it (`dispatch.py`)."""
    def tick(self) -> None:
        """Called five times a second while the build runs, for monitors that show elapsed times."""


NullMonitor = Monitor


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannedStage:
    """A stage the build will run, and how long it took before (None: never timed, nor its type)."""

    pipeline: Pipeline
    stage: Stage
    expected: float | None


EVENTS = tuple(name for name, value in vars(Monitor).items() if callable(value) and not name.startswith("_"))


class Tee(Monitor):
    """Hands every event to several monitors, in order (the build's report, its saved stream, the user's).

    Each event goes only to the monitors that handle it: a stage's every output line costs one call
    per monitor that shows it, not one per monitor.
    """

    def __init__(self, *monitors: Monitor) -> None:
        self.monitors = monitors
        for name in EVENTS:
            handlers = [getattr(m, name) for m in monitors if getattr(type(m), name) is not getattr(Monitor, name)]
            setattr(self, name, _fan_out(handlers))


def _fan_out(handlers: list[Any]) -> Any:
    if not handlers:
        return lambda *args, **kwargs: None
    if len(handlers) == 1:
        return handlers[0]

    def fan_out(*args: Any, **kwargs: Any) -> None:
        for handler in handlers:
            handler(*args, **kwargs)
    return fan_out


def omitempty(value: Any) -> Any:
    """Drop None and "" from dicts, recursively (lists are left alone), as osbuild's monitor does."""
    if isinstance(value, dict):
        return {k: omitempty(v) for k, v in value.items() if v is not None and v != ""}
    return value


def tail(output: str, limit: int = OUTPUT_LIMIT) -> str:
    if len(output) <= limit:
        return output
    return f"[...{len(output) - limit} bytes hidden...]\n{output[-limit:]}"


def source_line(source: Source, message: str) -> str:
    """A line of a source's output as osbuild prints its host services' output."""
    return f"source/{source.type} ({source.type}): {message}" + ("" if message.endswith("\n") else "\n")


def human_seconds(value: float) -> str:
    """`0.42s`, `12.3s`, `2m05s`, `1h02m`: short, and precise where it matters."""
    if value < 10:
        return f"{value:.2f}s"
    if value < 60:
        return f"{value:.1f}s"
    minutes, secs = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def describe_progress(progress: SourceProgress) -> str:
    """`3/12 items, 1.2 MiB/4.5+ MiB` (the `+`: the size of some items is not known yet)."""
    more = "" if progress.sized >= progress.items_total else "+"
    text = (f"{progress.items_done}/{progress.items_total} items, "
            f"{format_size(progress.bytes_done)}/{format_size(progress.bytes_total)}{more}")
    return text + (f", {progress.items_failed} failed" if progress.items_failed else "")


def progress_bar(progress: SourceProgress, width: int = 20) -> str:
    if progress.bytes_total and progress.sized >= progress.items_total:
        ratio = progress.bytes_done / progress.bytes_total
    else:
        ratio = progress.items_done / progress.items_total if progress.items_total else 1.0
    filled = max(0, min(width, int(ratio * width)))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class JsonSeqMonitor(Monitor):
    """RFC 7464 records in osbuild's `JSONSeqMonitor` format, one per line.

    Each context is sent in full the first time its id appears and as `{"id": ...}` afterwards.
    Progress has up to three levels: pipelines and sources, the stages of the record's pipeline, and
    what a stage reports about itself.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.total = 0
        self.done = 0
        self._sent_contexts: set[str] = set()
        self._context_ids: dict[tuple[str, str | None, str | None, str | None, str | None], str] = {}
        self._pipeline_progress: dict[str, list[int]] = {}
        self._stage_progress: dict[str, dict[str, Any]] = {}
        self._stage_started: dict[str, float] = {}

    def _context(self, origin: str, pipeline: tuple[str | None, str | None] = (None, None),
                 stage: tuple[str | None, str | None] = (None, None)) -> dict[str, Any]:
        key = (origin, *pipeline, *stage)
        cid = self._context_ids.get(key)
        if cid is not None and cid in self._sent_contexts:  # every line of a stage: hash it once
            return {"id": cid}
        context = {"origin": origin,
                   "pipeline": {"name": pipeline[0], "id": pipeline[1],
                                "stage": {"name": stage[0], "id": stage[1]}}}
        cid = self._context_ids[key] = context_id(context)
        if cid in self._sent_contexts:
            return {"id": cid}
        self._sent_contexts.add(cid)
        return {**context, "id": cid}

    def _progress(self, pipeline_name: str | None) -> dict[str, Any]:
        progress: dict[str, Any] = {"name": "pipelines/sources", "total": self.total, "done": self.done}
        sub = self._pipeline_progress.get(pipeline_name or "")
        if sub is not None:
            progress["progress"] = {"name": f"pipeline: {pipeline_name}", "done": sub[0], "total": sub[1]}
            stage_progress = self._stage_progress.get(pipeline_name or "")
            if stage_progress:
                progress["progress"]["progress"] = stage_progress
        return progress

    def _emit(self, *, message: str | None = None, result: dict[str, Any] | None = None,
              context: dict[str, Any], pipeline_name: str | None = None,
              options: dict[str, Any] | None = None, duration: float | None = None,
              metadata: dict[str, Any] | None = None) -> None:
        entry = {"message": message, "result": result, "context": context,
                 "progress": self._progress(pipeline_name), "options": options or None,
                 "timestamp": time.time(), "duration": duration, "metadata": metadata or None}
        write_all(self.fd, b"\x1e" + json.dumps(omitempty(entry)).encode() + b"\n")

    @staticmethod
    def _pid(pipeline: Pipeline) -> tuple[str | None, str | None]:
        return pipeline.name, pipeline.id

    def build_started(self, label: str, *, sources: int, pipelines: int) -> None:
        self.total = sources + pipelines
        self._emit(message=f"starting {label}", context=self._context("osbuild.main_cli"))

    def source_started(self, source: Source) -> None:
        name = f"source {source.type}"
        self._emit(message=f"Starting pipeline {name}",
                   context=self._context("osbuild.monitor", (name, source.id)))

    def source_log(self, source: Source, message: str) -> None:
        # osbuild's sources are host services, whose output it logs from org.osbuild in the source's context
        self._emit(message=source_line(source, message),
                   context=self._context("org.osbuild", (f"source {source.type}", source.id)))

    def source_finished(self, source: Source, results: Sequence[ItemResult], success: bool) -> None:
        name = f"source {source.type}"
        context = self._context("osbuild.monitor", (name, source.id))
        output = f"{name} finished successfully" if success else f"{name} failed"
        result = {"name": name, "source_type": source.type, "success": success, "output": output,
                  "results": [{"success": r.error is None,
                               "metadata": {"checksum": r.checksum, "cached": r.cached},
                               "error": r.error or ""} for r in results]}
        self._emit(message=f"Finished module {name}", result=result, context=context)
        self.done += 1
        self._emit(message=f"Finished pipeline {source.type}",
                   context=self._context("osbuild.monitor", (name, source.id)))

    def pipeline_started(self, pipeline: Pipeline, *, build_root: str, runner: str) -> None:
        if pipeline.stages:
            self._pipeline_progress[pipeline.name] = [0, len(pipeline.stages)]
        self._emit(message=f"Starting pipeline {pipeline.name}",
                   context=self._context("osbuild.monitor", self._pid(pipeline)),
                   pipeline_name=pipeline.name)

    def stage_started(self, pipeline: Pipeline, stage: Stage) -> None:
        self._stage_started[stage.id] = time.monotonic()
        self._emit(message=f"Starting module {stage.type}",
                   context=self._context("osbuild.monitor", self._pid(pipeline), (stage.type, stage.id)),
                   pipeline_name=pipeline.name)

    def stage_output(self, pipeline: Pipeline, stage: Stage, text: str) -> None:
        self._emit(message=text,
                   context=self._context(f"stages/{stage.type}", self._pid(pipeline), (stage.type, stage.id)),
                   pipeline_name=pipeline.name)

    def stage_progress(self, pipeline: Pipeline, stage: Stage, done: int, total: int, message: str) -> None:
        self._stage_progress[pipeline.name] = {"name": f"stage: {stage.type}", "done": done, "total": total}
        self._emit(message=message or None,
                   context=self._context(f"stages/{stage.type}", self._pid(pipeline), (stage.type, stage.id)),
                   pipeline_name=pipeline.name)

    def stage_finished(self, pipeline: Pipeline, stage: Stage, result: StageResult) -> None:
        self._stage_progress.pop(pipeline.name, None)
        sub = self._pipeline_progress.get(pipeline.name)
        if sub is not None and result.success:
            sub[0] += 1
        payload: dict[str, Any] = {"name": stage.type, "id": stage.id, "success": result.success,
                                   "output": tail(result.output)}
        if result.error:
            payload["error"] = result.error
        if result.cached:  # reported from the store: what the build that stored it reported
            payload["cached"] = True
        self._emit(message=f"Finished module {stage.type}", result=payload,
                   context=self._context("osbuild.monitor", self._pid(pipeline), (stage.type, stage.id)),
                   pipeline_name=pipeline.name, options=stage.options, duration=result.duration,
                   metadata=result.metadata)

    def pipeline_finished(self, pipeline: Pipeline, *, success: bool) -> None:
        if success:
            self.done += 1
        self._pipeline_progress.pop(pipeline.name, None)
        self._emit(message=f"Finished pipeline {pipeline.name}",
                   context=self._context("osbuild.monitor", self._pid(pipeline)))

    def pipeline_cached(self, pipeline: Pipeline) -> None:
        self._emit(message=f"Pipeline {pipeline.name} is cached",
                   context=self._context("osbuild.monitor", self._pid(pipeline)))

    def log(self, message: str, pipeline: Pipeline | None = None) -> None:
        ids = self._pid(pipeline) if pipeline else (None, None)
        self._emit(message=message, context=self._context("org.osbuild", ids),
                   pipeline_name=pipeline.name if pipeline else None)

    def worker_log(self, worker: str, message: str, pipeline: Pipeline | None = None) -> None:
        ids = self._pid(pipeline) if pipeline else (None, None)
        self._emit(message=message, context=self._context(f"aosbuild.worker/{worker}", ids),
                   pipeline_name=pipeline.name if pipeline else None)

    def build_finished(self, label: str, *, success: bool) -> None:
        outcome = "finished successfully" if success else "failed"
        self._emit(message=f"manifest {label} {outcome}\n", context=self._context("osbuild.main_cli"))


class LogMonitor(Monitor):
    """Human-readable progress in osbuild's `LogMonitor` layout, with per-stage durations.

    On a terminal a status line at the bottom shows which pipelines and stages are running and how far
    the build is; off a terminal only plain lines are written. Output of pipelines that run at the same
    time is prefixed with the pipeline's name so interleaved lines stay readable.
    """

    def __init__(self, fd: int, *, tty: bool | None = None) -> None:
        self.fd = fd
        self.tty = os.isatty(fd) if tty is None else tty
        self.total = 0
        self.done = 0
        self._running: dict[str, str] = {}  # pipeline name -> "stage-type i/n"
        self._sources: dict[str, SourceProgress] = {}  # source type -> its latest progress
        self._deciles: dict[str, int] = {}  # source type -> tenths of its items done, as last printed
        self._started: dict[str, float] = {}
        self._status_shown = False
        self._parallel = False

    def _write(self, text: str) -> None:
        data = text
        if self.tty:
            data = ("\r\x1b[K" if self._status_shown else "") + text + self._status_line()
            self._status_shown = True
        write_all(self.fd, data.encode(errors="replace"))

    def _status_line(self) -> str:
        running = ", ".join(f"{name} ({what})" for name, what in self._running.items()) or "-"
        line = f"\x1b[1m[{self.done}/{self.total}]\x1b[0m running: {running}"
        for source_type, progress in self._sources.items():
            line += f" | {source_type} {progress_bar(progress)} {describe_progress(progress)}"
        return line

    def _prefix(self, pipeline: Pipeline) -> str:
        # once pipelines have run side by side, every line says whose it is, to the end of the build
        self._parallel = self._parallel or len(self._running) > 1
        return f"{pipeline.name}| " if self._parallel else ""

    def build_started(self, label: str, *, sources: int, pipelines: int) -> None:
        self.total = sources + pipelines
        self._write(f"starting {label}\n")

    def source_started(self, source: Source) -> None:
        self._write(f"Pipeline source {source.type}: {source.id}\n")

    def source_log(self, source: Source, message: str) -> None:
        self._write(source_line(source, message))

    def source_progress(self, source: Source, progress: SourceProgress) -> None:
        self._sources[source.type] = progress
        if self.tty:
            self._write("")
            return
        # off a terminal, a plain line at every tenth of the items
        decile = progress.items_done * 10 // progress.items_total if progress.items_total else 10
        if self._deciles.get(source.type, 0) < decile < 10:  # the tenth tenth is source_finished's line
            self._deciles[source.type] = decile
            self._write(f"source {source.type}: {describe_progress(progress)}\n")

    def source_finished(self, source: Source, results: Sequence[ItemResult], success: bool) -> None:
        self.done += 1
        self._sources.pop(source.type, None)
        fetched = [r for r in results if not r.cached and r.error is None]
        cached = sum(1 for r in results if r.cached)
        failed = sum(1 for r in results if r.error is not None)
        outcome = "done" if success else "FAILED"
        text = (f"source {source.type}: {outcome}: {len(fetched)} fetched "
                f"({format_size(sum(r.size for r in fetched))}), {cached} cached")
        self._write(text + (f", {failed} failed\n" if failed else "\n"))

    def pipeline_started(self, pipeline: Pipeline, *, build_root: str, runner: str) -> None:
        self._running[pipeline.name] = "starting"
        self._write(f"Pipeline {pipeline.name}: {pipeline.id}\nBuild\n  root: {build_root}\n"
                    f"  runner: {runner} ({runner})\n")

    def stage_started(self, pipeline: Pipeline, stage: Stage) -> None:
        index = pipeline.stages.index(stage) + 1
        self._running[pipeline.name] = f"{stage.type} {index}/{len(pipeline.stages)}"
        options = json.dumps(stage.options, indent=2)
        self._write(f"{self._prefix(pipeline)}{stage.type}: {stage.id} {options}\n")

    def stage_output(self, pipeline: Pipeline, stage: Stage, text: str) -> None:
        self._write(self._prefix(pipeline) + text + ("" if text.endswith("\n") else "\n"))

    def stage_finished(self, pipeline: Pipeline, stage: Stage, result: StageResult) -> None:
        if result.cached:
            self._write(f"{self._prefix(pipeline)}{stage.type}: {stage.id} (cached; it took "
                        f"{result.duration:.2f}s)\n")
            return
        outcome = "" if result.success else f" (failed: {result.reason})"
        self._write(f"{self._prefix(pipeline)}\u23f1  Duration: {result.duration:.2f}s{outcome}\n")

    def pipeline_finished(self, pipeline: Pipeline, *, success: bool) -> None:
        self._running.pop(pipeline.name, None)
        if success:
            self.done += 1

    def pipeline_cached(self, pipeline: Pipeline) -> None:
        self._write(f"Pipeline {pipeline.name}: {pipeline.id} (cached)\n")

    def log(self, message: str, pipeline: Pipeline | None = None) -> None:
        self._write(message if message.endswith("\n") else message + "\n")

    def worker_log(self, worker: str, message: str, pipeline: Pipeline | None = None) -> None:
        self._write(message if message.endswith("\n") else message + "\n")

    def build_finished(self, label: str, *, success: bool) -> None:
        self._running.clear()
        self._write(f"manifest {label} {'finished successfully' if success else 'failed'}\n")
        if self.tty and self._status_shown:
            write_all(self.fd, b"\r\x1b[K")
            self._status_shown = False


MONITORS: dict[str, type[Monitor] | None] = {
    "null": Monitor, "NullMonitor": Monitor,
    "log": LogMonitor, "LogMonitor": LogMonitor,
    "jsonseq": JsonSeqMonitor, "JSONSeqMonitor": JsonSeqMonitor,
    "live": None,  # liveview.LiveMonitor, imported when chosen (it builds on this module)
}


def make_monitor(name: str, fd: int) -> Monitor:
    cls = MONITORS[name]
    if cls is None:
        from .liveview import LiveMonitor

        return LiveMonitor(fd)
    if cls is Monitor:
        return Monitor()
    return cls(fd)  # type: ignore[call-arg]  # the other monitors take the output descriptor


__all__ = ["MONITORS", "JsonSeqMonitor", "LogMonitor", "Monitor", "NullMonitor", "PlannedStage", "Tee", "make_monitor"]
