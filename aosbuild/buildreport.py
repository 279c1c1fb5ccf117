"""What one build did, as `engine.build()` returns it: per pipeline, what was cached, built or failed.

The report is collected by `Recorder`, a monitor that hears the same events as the user's monitor, so
the CLI's `--json` document, its summary and the store's record of durations all come from what the
build reported, not from state the engine's parts write into a shared context.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .monitor import Monitor
from .results import StageResult

if TYPE_CHECKING:
    from .errors import AosbuildError
    from .manifest import Pipeline, Stage
    from .sources import ItemResult

BUILT, CACHED, FAILED, UNFINISHED = "built", "cached", "failed", "unfinished"


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineReport:
    name: str
    id: str | None
    status: str                          # built, cached (found whole in the store), failed, unfinished
    results: tuple[StageResult, ...]     # in order: restored from the store (cached=True), then run


@dataclass(frozen=True, slots=True, kw_only=True)
class Export:
    name: str
    path: Path
    size: int                            # bytes of the files in it


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildReport:
    label: str
    success: bool
    wall: float                          # seconds from the build's start to its end
    pipelines: tuple[PipelineReport, ...] = ()   # in the order they started or were found
    sources: Mapping[str, Sequence[ItemResult]] = field(default_factory=dict)
    exports: tuple[Export, ...] = ()
    failed: StageResult | None = None    # the stage that failed the build
    error: AosbuildError | None = None   # why the build failed, when it did

    @property
    def logs(self) -> dict[str, list[StageResult]]:
        """Stage results per pipeline name, as osbuild's `--json` `log` lists them."""
        return {p.name: list(p.results) for p in self.pipelines}

    @property
    def cached(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.pipelines if p.status == CACHED)

    def metadata(self) -> dict[str, dict[str, Any]]:
        """Stage metadata, `{pipeline: {stage type: metadata}}`, of the stages that succeeded."""
        result: dict[str, dict[str, Any]] = {}
        for pipeline in self.pipelines:
            entries = {r.type: r.metadata for r in pipeline.results if r.success and r.metadata}
            if entries:
                result[pipeline.name] = entries
        return result

    def count(self, *, cached: bool) -> int:
        """Stages run by this build (cached=False) or taken from the store (cached=True)."""
        return sum(1 for p in self.pipelines for r in p.results if r.success and r.cached == cached)

    def timed(self) -> dict[str, tuple[str, float]]:
        """`{stage id: (type, seconds)}` of the stages this build ran to success, for the store's record."""
        return {r.id: (r.type, r.duration) for p in self.pipelines for r in p.results if r.success and not r.cached}


class Recorder(Monitor):
    """A monitor that keeps what the events say happened, and makes the report when asked."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._pipelines: dict[str, tuple[str | None, list[StageResult]]] = {}
        self._status: dict[str, str] = {}
        self._exports: list[Export] = []
        self._failed: StageResult | None = None

    def _pipeline(self, pipeline: Pipeline, status: str) -> None:
        self._pipelines.setdefault(pipeline.name, (pipeline.id, []))
        self._status[pipeline.name] = status

    def build_started(self, label: str, *, sources: int, pipelines: int) -> None:
        self.started = time.monotonic()

    def pipeline_cached(self, pipeline: Pipeline) -> None:
        self._pipeline(pipeline, CACHED)

    def pipeline_started(self, pipeline: Pipeline, *, build_root: str, runner: str) -> None:
        self._pipeline(pipeline, UNFINISHED)

    def stage_finished(self, pipeline: Pipeline, stage: Stage, result: StageResult) -> None:
        self._pipelines.setdefault(pipeline.name, (pipeline.id, []))[1].append(result)
        if not result.success:
            self._failed = result

    def pipeline_finished(self, pipeline: Pipeline, *, success: bool) -> None:
        self._status[pipeline.name] = BUILT if success else FAILED

    def exported(self, name: str, path: Path, size: int) -> None:
        self._exports.append(Export(name=name, path=path, size=size))

    def report(self, label: str, *, success: bool, sources: Mapping[str, Sequence[ItemResult]],
               error: AosbuildError | None = None) -> BuildReport:
        pipelines = tuple(PipelineReport(name=name, id=pid, status=self._status.get(name, UNFINISHED),
                                         results=tuple(results))
                          for name, (pid, results) in self._pipelines.items())
        return BuildReport(label=label, success=success, wall=time.monotonic() - self.started,
                           pipelines=pipelines, sources=sources, exports=tuple(self._exports),
                           failed=self._failed, error=error)


def shown_path(path: Path) -> Path:
    """An export that holds one file (a disk image, a tarball) is shown as that file."""
    try:
        entries = list(path.iterdir())
    except OSError:
        return path
    return entries[0] if len(entries) == 1 and entries[0].is_file() else path


def what_was_made(report: BuildReport, report_command: str) -> str:
    """The end of a build in a few lines: each export with its size, what was built or reused, the wall
    time, and the command that shows where the time went."""
    from .monitor import human_seconds
    from .sizes import format_size

    built, cached = report.count(cached=False), report.count(cached=True)
    outcome = "built in" if report.success else "failed after"
    lines = [f"{report.label} {outcome} {human_seconds(report.wall)}: {built} stage{'s' * (built != 1)} built, "
             f"{cached} cached"]
    width = max((len(e.name) for e in report.exports), default=0)
    for export in report.exports:
        lines.append(f"  {export.name:<{width}}  {shown_path(export.path)}  {format_size(export.size)}")
    if report.success and not report.exports and report.pipelines:
        lines.append("  (the trees are in the store; --export NAME --output-directory DIR copies one out)")
    lines.append(f"Where the time went: {report_command}")
    return "\n".join(lines) + "\n"
