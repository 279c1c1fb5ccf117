"""A pipeline's monitor events carried from the worker that built it to the client that asked for it.

A worker's engine reports to an `EventRecorder`, which keeps each event of the one pipeline its task
builds as plain JSON-able values; the client's `Replayer` hands them to its own monitor (the Tee of
report, saved stream and the user's monitor) with its own manifest's pipelines and stages, so that
`--monitor`, `--json` and `aosbuild report --last` of a dispatched build come out of the same events
as a local build's. A failed pipeline's events travel inside `RemoteFailure`, the exception its task
raises. Only short progress lines (a stage starting, finishing) go out while the pipeline runs, as Dask
events: a pipeline run again after its worker died must not report its stages twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import AosbuildError, StageError
from .monitor import Monitor
from .results import StageResult
from .sources import ItemResult, SourceProgress

if TYPE_CHECKING:
    from .manifest import Manifest, Pipeline, Source, Stage

Event = list[Any]  # [name, *arguments], every argument JSON-able


def progress_topic(pipeline_id: str) -> str:
    """The Dask event topic of a pipeline's progress lines, heard live by the clients that want it."""
    return f"aosbuild-progress-{pipeline_id}"


class EventRecorder(Monitor):
    """The events of one pipeline (and of the sources), as a worker's build of it reports them.

    The worker's build plans the pipeline's build root and inputs too, found in its store or pulled from
    the remote cache; their events are left out: their own tasks reported them.
    """

    def __init__(self, pipeline_id: str, live: Callable[[str], None] | None = None) -> None:
        self.pipeline_id = pipeline_id
        self.live = live  # a line for the clients as it happens: a stage starting, finishing
        self.events: list[Event] = []
        self.stages_run = 0

    def _mine(self, pipeline: Pipeline | None) -> bool:
        return pipeline is not None and pipeline.id == self.pipeline_id

    def source_started(self, source: Source) -> None:
        self.events.append(["source_started", source.id])

    def source_log(self, source: Source, message: str) -> None:
        self.events.append(["source_log", source.id, message])

    def source_progress(self, source: Source, progress: SourceProgress) -> None:
        self.events.append(["source_progress", source.id, dataclasses.asdict(progress)])

    def source_finished(self, source: Source, results: Sequence[ItemResult], success: bool) -> None:
        self.events.append(["source_finished", source.id, [dataclasses.asdict(r) for r in results], success])

    def pipeline_started(self, pipeline: Pipeline, *, build_root: str, runner: str) -> None:
        if self._mine(pipeline):
            self.events.append(["pipeline_started", build_root, runner])

    def stage_started(self, pipeline: Pipeline, stage: Stage) -> None:
        if self._mine(pipeline):
            self.events.append(["stage_started", stage.id])
            if self.live is not None:
                index = pipeline.stages.index(stage) + 1
                self.live(f"pipeline {pipeline.name}: stage {stage.type} ({index}/{len(pipeline.stages)}) "
                          "started\n")

    def stage_output(self, pipeline: Pipeline, stage: Stage, text: str) -> None:
        if self._mine(pipeline):
            self.events.append(["stage_output", stage.id, text])

    def stage_progress(self, pipeline: Pipeline, stage: Stage, done: int, total: int, message: str) -> None:
        if self._mine(pipeline):
            self.events.append(["stage_progress", stage.id, done, total, message])

    def stage_finished(self, pipeline: Pipeline, stage: Stage, result: StageResult) -> None:
        if self._mine(pipeline):
            self.stages_run += not result.cached
            self.events.append(["stage_finished", stage.id, dataclasses.asdict(result)])
            if self.live is not None and not result.cached:
                outcome = "finished" if result.success else f"failed: {result.reason}"
                self.live(f"pipeline {pipeline.name}: stage {stage.type} {outcome} in {result.duration:.2f}s\n")

    def pipeline_finished(self, pipeline: Pipeline, *, success: bool) -> None:
        if self._mine(pipeline):
            self.events.append(["pipeline_finished", success])

    def pipeline_cached(self, pipeline: Pipeline) -> None:
        if self._mine(pipeline):
            self.events.append(["pipeline_cached"])

    def log(self, message: str, pipeline: Pipeline | None = None) -> None:
        if pipeline is None or self._mine(pipeline):
            self.events.append(["log", message, pipeline is not None])


class RemoteFailure(Exception):
    """A pipeline's task failed on a worker: the error as data, with the events up to the failure.

    Plain values only, so that it pickles between machines whatever aosbuild's classes become."""

    def __init__(self, outcome: dict[str, Any]) -> None:
        super().__init__(outcome)
        self.outcome = outcome

    def __str__(self) -> str:
        return str(self.outcome.get("error", {}).get("message", "failed"))


class DispatchedError(AosbuildError):
    """A pipeline failed on a worker for a reason other than a stage's (its store, its sources, ...)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def describe_error(error: AosbuildError) -> dict[str, Any]:
    """What a client needs to raise the same error as a local build (a stage's fields, or the message)."""
    described: dict[str, Any] = {"kind": type(error).__name__, "message": str(error),
                                 "exit_code": error.exit_code}
    if isinstance(error, StageError):
        described.update(pipeline=error.pipeline, stage=error.stage, stage_id=error.stage_id, reason=error.reason,
                         output_tail=error.output_tail)
    return described


def rebuild_error(described: dict[str, Any], worker: str) -> AosbuildError:
    """The client's error for a worker's: a failed stage exactly as a local build reports it."""
    if described.get("kind") == "StageError":
        return StageError(pipeline=described["pipeline"], stage=described["stage"], stage_id=described["stage_id"],
                          reason=described["reason"], output_tail=described["output_tail"])
    return DispatchedError(f"on worker {worker}: {described.get('message')}", int(described.get("exit_code", 1)))


class Replayer:
    """Hands a worker's events to the client's monitor, with the client's own pipelines and stages.

    The sources are reported the first time a worker reports them: every worker fetches them for itself,
    but the build's progress counts each source once.
    """

    def __init__(self, manifest: Manifest, monitor: Monitor) -> None:
        self.manifest = manifest
        self.monitor = monitor
        self.sources = {source.id: source for source in manifest.sources}
        self._sources_shown: set[str] = set()

    def replay(self, pipeline: Pipeline, events: Sequence[Event]) -> None:
        stages = {stage.id: stage for stage in pipeline.stages}
        current: set[str] = set()  # the sources whose events this batch reports
        m = self.monitor
        for name, *args in events:
            if name.startswith("source_"):
                source = self.sources.get(args[0])
                if source is None:
                    continue
                if name == "source_started" and args[0] not in self._sources_shown:
                    self._sources_shown.add(args[0])
                    current.add(args[0])
                if args[0] not in current:
                    continue
                if name == "source_started":
                    m.source_started(source)
                elif name == "source_log":
                    m.source_log(source, args[1])
                elif name == "source_progress":
                    m.source_progress(source, SourceProgress(**args[1]))
                elif name == "source_finished":
                    m.source_finished(source, [ItemResult(**r) for r in args[1]], args[2])
            elif name == "pipeline_started":
                m.pipeline_started(pipeline, build_root=args[0], runner=args[1])
            elif name == "pipeline_finished":
                m.pipeline_finished(pipeline, success=args[0])
            elif name == "pipeline_cached":
                m.pipeline_cached(pipeline)
            elif name == "log":
                m.log(args[0], pipeline if args[1] else None)
            elif args and args[0] in stages:
                stage = stages[args[0]]
                if name == "stage_started":
                    m.stage_started(pipeline, stage)
                elif name == "stage_output":
                    m.stage_output(pipeline, stage, args[1])
                elif name == "stage_progress":
                    m.stage_progress(pipeline, stage, args[1], args[2], args[3])
                elif name == "stage_finished":
                    m.stage_finished(pipeline, stage, StageResult(**args[1]))
