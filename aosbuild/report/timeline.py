"""Reading a `--monitor jsonseq` stream back into a timeline: when each pipeline and stage ran.

The reader is tolerant: it takes osbuild's streams as well as aosbuild's, records with or without the
RS byte, and skips what is not a record (a truncated last line, a stray blank line) instead of failing,
so a report can be made of an interrupted build. Contexts are resolved as Go clients do: the first full
definition of an id wins, and later `{"id": ...}` records use it.

What the stream says is taken from the `osbuild.monitor` messages ("Starting pipeline X", "Starting
module T", "Finished module T", "Finished pipeline X", "Pipeline X is cached") and the main_cli's start
and end lines. Pipeline names come from the messages, not from the context: osbuild's "Starting pipeline"
carries the previous pipeline's stage, and its "Finished pipeline" the last stage's context. Stages are
attributed through their context, since pipelines that run at the same time interleave their records.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

MONITOR = "osbuild.monitor"
MAIN_CLI = "osbuild.main_cli"
SOURCE_PREFIX = "source "

_BUILD_END = re.compile(r"manifest (?P<label>.*) (?P<outcome>finished successfully|failed)\s*$")


@dataclass(frozen=True, slots=True, kw_only=True)
class StageRun:
    type: str
    id: str | None
    start: float
    end: float
    reported: float | None  # the engine's own measure of the stage (a record's `duration`), if any
    status: str             # "ok", "failed" or "unfinished" (the stream ends before the stage did)

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineRun:
    name: str
    id: str | None
    kind: str                     # "pipeline", or "source" for osbuild's source pseudo-pipelines
    status: str                   # "built", "failed", "unfinished" or "cached"
    start: float | None = None    # None for a cached pipeline, which did not run
    end: float | None = None
    stages: tuple[StageRun, ...] = ()
    stage_count: int | None = None  # how many stages the pipeline has, from the progress records

    @property
    def ran(self) -> bool:
        return self.start is not None and self.end is not None

    @property
    def duration(self) -> float:
        return (self.end - self.start) if self.start is not None and self.end is not None else 0.0

    @property
    def resumed(self) -> int:
        """Stages not run because the pipeline resumed from a checkpoint in the store."""
        if self.status != "built" or self.stage_count is None:
            return 0
        return max(0, self.stage_count - len(self.stages))


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeline:
    label: str | None             # the manifest's name as the build printed it
    start: float                  # the build's first record ("starting X"), as time.time()
    end: float                    # its last ("manifest X finished successfully"), or the stream's last record
    success: bool | None          # None: the stream ends before the build did
    pipelines: tuple[PipelineRun, ...]  # in the order they started; cached ones last
    records: int
    skipped: int                  # lines that were not records

    @property
    def wall(self) -> float:
        return self.end - self.start

    def by_name(self, name: str) -> PipelineRun | None:
        return next((p for p in self.pipelines if p.name == name), None)


class StreamError(ValueError):
    """The text holds no monitor record at all."""


def records(text: str) -> Iterator[dict[str, Any] | None]:
    """Every record of the stream; None for a fragment that is not one.

    JSON escapes RS and LF inside strings, so both split records: this also reads records without RS,
    and two records on one line.
    """
    for line in text.split("\n"):
        for fragment in line.split("\x1e"):
            if not fragment.strip():
                continue
            try:
                value = json.loads(fragment)
            except ValueError:
                yield None
                continue
            yield value if isinstance(value, dict) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _float(value: Any) -> float | None:
    # NaN and infinity are no measure (and would make `--format json` print what is not JSON)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


@dataclass
class _Stage:
    type: str
    id: str | None
    start: float
    end: float | None = None
    duration: float | None = None
    success: bool | None = None

    def freeze(self, stream_end: float) -> StageRun:
        end = self.end if self.end is not None else stream_end
        status = "unfinished" if self.end is None else "ok" if self.success is not False else "failed"
        return StageRun(type=self.type, id=self.id, start=self.start, end=end, reported=self.duration,
                        status=status)


@dataclass
class _Pipeline:
    name: str
    id: str | None = None
    start: float | None = None
    end: float | None = None
    cached: bool = False
    failed: bool = False
    stage_count: int | None = None
    stages: list[_Stage] = field(default_factory=list)

    def freeze(self, stream_end: float) -> PipelineRun:
        stages = tuple(s.freeze(stream_end) for s in self.stages)
        kind = "source" if self.name.startswith(SOURCE_PREFIX) else "pipeline"
        if self.start is None:
            return PipelineRun(name=self.name, id=self.id, kind=kind, status="cached",
                               stage_count=self.stage_count)
        if self.failed or any(s.status == "failed" for s in stages):
            status = "failed"
        elif self.end is None or any(s.status == "unfinished" for s in stages):
            status = "unfinished"
        else:
            status = "built"
        return PipelineRun(name=self.name, id=self.id, kind=kind, status=status, start=self.start,
                           end=self.end if self.end is not None else stream_end, stages=stages,
                           stage_count=self.stage_count)


class _Reader:
    def __init__(self) -> None:
        self.contexts: dict[str, dict[str, Any]] = {}
        self.pipelines: dict[str, _Pipeline] = {}
        self.label: str | None = None
        self.build_start: float | None = None
        self.build_end: float | None = None
        self.success: bool | None = None
        self.first: float | None = None
        self.last: float | None = None
        self.count = 0
        self.skipped = 0

    def resolve(self, context: Any) -> dict[str, Any]:
        if not isinstance(context, dict):
            return {}
        cid = context.get("id")
        full = "origin" in context or "pipeline" in context
        if not isinstance(cid, str):
            return context if full else {}
        if full and cid not in self.contexts:
            self.contexts[cid] = context
        return self.contexts.get(cid, {})

    def pipeline(self, name: str) -> _Pipeline:
        return self.pipelines.setdefault(name, _Pipeline(name=name))

    def read(self, record: dict[str, Any]) -> None:
        self.count += 1
        ts = _float(record.get("timestamp"))
        if ts is None:
            ts = self.last  # a record without a time happened no earlier than the one before
        if ts is None:
            return
        self.first = ts if self.first is None else min(self.first, ts)
        self.last = ts if self.last is None else max(self.last, ts)
        context = self.resolve(record.get("context"))
        origin = _str(context.get("origin"))
        ctx_pipeline = _dict(context.get("pipeline"))
        self.progress(record.get("progress"))
        message = _str(record.get("message")) or ""
        if origin == MAIN_CLI:
            self.main_cli(message, ts)
        elif origin in (MONITOR, None):
            self.monitor(message, ts, record, ctx_pipeline)

    def progress(self, progress: Any) -> None:
        sub = progress.get("progress") if isinstance(progress, dict) else None
        name = _str(sub.get("name")) if isinstance(sub, dict) else None
        total = sub.get("total") if isinstance(sub, dict) else None
        if name and name.startswith("pipeline: ") and isinstance(total, int):
            self.pipeline(name.removeprefix("pipeline: ")).stage_count = total

    def main_cli(self, message: str, ts: float) -> None:
        if message.startswith("starting ") and self.build_start is None:
            self.label, self.build_start = message.removeprefix("starting ").strip(), ts
        elif match := _BUILD_END.match(message):
            self.label = self.label or match["label"]
            self.build_end, self.success = ts, match["outcome"] == "finished successfully"

    def monitor(self, message: str, ts: float, record: dict[str, Any], ctx_pipeline: dict[str, Any]) -> None:
        if message.startswith("Starting pipeline "):
            name = message.removeprefix("Starting pipeline ").strip()
            p = self.pipeline(name)
            p.start, p.end, p.cached = ts, None, False
            if ctx_pipeline.get("name") == name:
                p.id = _str(ctx_pipeline.get("id"))
        elif message.startswith("Pipeline ") and message.endswith(" is cached"):
            name = message.removeprefix("Pipeline ").removesuffix(" is cached")
            p = self.pipeline(name)
            p.cached = True
            if ctx_pipeline.get("name") == name:
                p.id = _str(ctx_pipeline.get("id"))
        elif message.startswith("Starting module "):
            running = self.running_pipeline(ctx_pipeline)
            if running is not None:
                stage = _dict(ctx_pipeline.get("stage"))
                running.stages.append(_Stage(type=message.removeprefix("Starting module ").strip(),
                                             id=_str(stage.get("id")), start=ts))
        elif message.startswith("Finished module "):
            self.finished_module(message.removeprefix("Finished module ").strip(), ts, record, ctx_pipeline)
        elif message.startswith("Finished pipeline "):
            name = message.removeprefix("Finished pipeline ").strip()
            # osbuild names a source's end "Finished pipeline <type>", without the "source " prefix
            candidates = [self.pipelines.get(name), self.pipelines.get(SOURCE_PREFIX + name)]
            ending = next((c for c in candidates if c is not None and c.start is not None and c.end is None), None)
            if ending is not None:
                ending.end = ts

    def running_pipeline(self, ctx_pipeline: dict[str, Any]) -> _Pipeline | None:
        name = _str(ctx_pipeline.get("name"))
        if name is not None and name in self.pipelines:
            return self.pipelines[name]
        running = [p for p in self.pipelines.values() if p.start is not None and p.end is None]
        return running[-1] if running else None  # a context we could not resolve: the newest pipeline

    def finished_module(self, module: str, ts: float, record: dict[str, Any], ctx_pipeline: dict[str, Any]) -> None:
        result = _dict(record.get("result"))
        success = result.get("success") if isinstance(result.get("success"), bool) else None
        if result.get("cached") is True:  # aosbuild repeats a stored stage's result: it did not run now
            return
        if module.startswith(SOURCE_PREFIX):  # a source's result: it has no stages
            source = self.pipelines.get(module)
            if source is not None and success is False:
                source.failed = True
            return
        stage_ctx = _dict(ctx_pipeline.get("stage"))
        stage_id = _str(stage_ctx.get("id")) or _str(result.get("id"))
        open_stages = [(p, s) for p in self.pipelines.values() for s in p.stages if s.end is None]
        name = _str(ctx_pipeline.get("name"))
        match = (next(((p, s) for p, s in open_stages if p.name == name and s.id == stage_id), None)
                 or next(((p, s) for p, s in open_stages if stage_id and s.id == stage_id), None)
                 or next(((p, s) for p, s in reversed(open_stages) if s.type == module), None))
        if match is None:
            return
        pipeline, stage = match
        stage.end, stage.duration, stage.success = ts, _float(record.get("duration")), success
        if success is False:
            pipeline.failed = True

    def timeline(self) -> Timeline:
        if self.first is None or self.last is None:
            raise StreamError("no monitor records")
        start = self.build_start if self.build_start is not None else self.first
        end = self.build_end if self.build_end is not None else self.last
        runs = [p.freeze(end) for p in self.pipelines.values() if p.start is not None or p.cached]
        # in the order they started, those that did not run (cached) last
        pipelines = tuple(sorted(runs, key=lambda p: (p.start is None, p.start or 0.0)))
        return Timeline(label=self.label, start=start, end=end, success=self.success, pipelines=pipelines,
                        records=self.count, skipped=self.skipped)


def read_timeline(text: str) -> Timeline:
    """The timeline of one build's stream; StreamError if it holds no record."""
    reader = _Reader()
    for record in records(text):
        if record is None:
            reader.skipped += 1
        else:
            reader.read(record)
    return reader.timeline()
