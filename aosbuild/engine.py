"""One whole build: plan, fetch and build concurrently, export, and say what happened.

This is the async entry point the CLI runs on trio (or asyncio); it owns the build context and makes
sure the monitor hears the beginning and the end of the build, however it ends.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import anyio

from . import formats, pidns, planner, scheduler
from .buildreport import BuildReport, Recorder
from .context import BuildContext, BuildOptions
from .download import DownloadOptions
from .errors import AosbuildError, flatten
from .exporting import export_target, export_tree
from .exportmarks import ExportMark
from .history import Durations, History, SavedStream
from .library import Library
from .logs import get_logger
from .manifest import Manifest, Pipeline
from .monitor import Monitor, PlannedStage, Tee
from .remotesettings import RemoteSettings
from .results import StageResult
from .sources import Sources
from .store import Store

if TYPE_CHECKING:
    from .remotecache import RemoteCache

log = get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """What the user asked of a build."""

    label: str                              # how the manifest is named in messages
    exports: tuple[str, ...] = ()           # pipeline names or ids
    output_directory: Path | None = None
    checkpoints: tuple[str, ...] = ()       # fnmatch patterns
    jobs: int | None = None
    stage_timeout: float | None = None
    download: DownloadOptions = field(default_factory=DownloadOptions)
    sources_only: bool = False              # fetch the sources the exports need (or all), build nothing
    remote: RemoteSettings | None = None  # registries of the store's second tier
    targets: tuple[str, ...] = ()           # pipelines to build besides the exports (none: all, unless exports)
    executor: Executor | None = None        # builds the planned pipelines elsewhere (dispatch.py); None: here


class Executor(Protocol):
    """What builds a plan's pipelines instead of this process's scheduler (the Dask dispatcher): by the
    time `run` returns, the exported pipelines are in the local store for `export` to copy out."""

    async def run(self, ctx: BuildContext, planned: Sequence[planner.Step], request: Request) -> None: ...


def needed_items(manifest: Manifest, exports: Sequence[Pipeline]) -> frozenset[str] | None:
    """The source items the exported pipelines use, with their build roots and inputs, transitively.

    None means every item: nothing was exported, or the manifest's format lets stages name the files they
    use in their options rather than through inputs (v1).
    """
    if not exports or not formats.of(manifest).SOURCES_THROUGH_INPUTS:
        return None
    items: set[str] = set()
    seen: set[str] = set()
    todo = [p.id for p in exports if p.id is not None]
    while todo:
        pipeline = manifest.by_id(todo.pop())
        if pipeline is None or pipeline.id in seen:
            continue  # a pipeline only the store has, or one visited already
        seen.add(str(pipeline.id))
        items.update(ref for stage in pipeline.stages for ref in stage.source_refs())
        todo.extend(pipeline.dependencies())
    return frozenset(items)


async def export(ctx: BuildContext, pipeline: Pipeline, name: str, output_directory: Path) -> None:
    """Copy the pipeline's tree to OUTDIR/NAME, replacing what was there only when the copy is complete."""
    target = export_target(output_directory, name)
    if pipeline.id is None:
        await export_tree(None, target)
    else:
        view, what = ctx.pins.view(pipeline.id), f"cannot export {name}"

        async def copy(src: Path, dst: Path) -> None:
            await ctx.store.copy_view(view, dst, what)

        mark = ExportMark(store=ctx.store.root, tree=pipeline.id)  # the same export again: kept as it is
        await export_tree(view.layers[0], target, copy=copy, mark=mark)
    ctx.monitor.exported(name, target, await anyio.to_thread.run_sync(tree_size, target))


def tree_size(path: Path) -> int:
    """Bytes of the regular files under `path` (what a user sees with `du --apparent-size`)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


def report_cached(ctx: BuildContext, cached: Sequence[Pipeline]) -> None:
    """Report the pipelines found in the store, stage by stage, as the build that stored them did."""
    for pipeline in cached:
        assert pipeline.id is not None
        ctx.monitor.pipeline_cached(pipeline)
        stages = {stage.id: stage for stage in pipeline.stages}
        for result in (StageResult.from_record(r) for r in ctx.pins.results(pipeline.id)):
            if result.id in stages:
                ctx.monitor.stage_finished(pipeline, stages[result.id], result)


def planned_stages(plan: planner.Plan, durations: Durations) -> list[PlannedStage]:
    """The stages the build will run, each with how long it took before (for the live view's estimate)."""
    return [PlannedStage(pipeline=item.pipeline, stage=stage, expected=durations.expect(stage.id, stage.type))
            for item in plan.build for stage in item.pipeline.stages[item.resume:]]


async def release(ctx: BuildContext) -> None:
    """Let go of the store: unpin what the build held, and mark the source items it used as used."""
    with anyio.CancelScope(shield=True):
        await ctx.pins.aclose()
        used = [ctx.sources.path(item.checksum) for items in ctx.sources.results.values() for item in items
                if item.error is None]
        await anyio.to_thread.run_sync(ctx.store.finish, used)


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """A checked and planned build: nothing has run yet."""

    ctx: BuildContext
    plan: planner.Plan | None   # None: only sources are fetched (`--sources-only`)
    recorder: Recorder
    history: History
    stream_fd: int | None   # where the store's copy of the build's jsonseq stream goes


def prepare(manifest: Manifest, request: Request, *, store: Store, library: Library,
            monitor: Monitor) -> Prepared:
    """Check the request against the manifest and plan the build; nothing runs yet.

    Besides the user's monitor, every event goes to the build's report and to the store's saved
    stream of this build (`history.py`), so `aosbuild report --last` needs nothing saved beforehand.
    """
    stored = planner.Predicate(store.contains)
    plan: planner.Plan | None = None
    if request.sources_only:  # the request is checked all the same
        exports = planner.resolve_exports(manifest, request.exports)
        checkpoints = planner.match_checkpoints(manifest, request.checkpoints)
    else:  # pinned below, once the build holds the store
        plan = planner.plan(planner.Goal(manifest=manifest, exports=request.exports, targets=request.targets,
                                         checkpoints=request.checkpoints), stored)
        exports, checkpoints = [p for _name, p in plan.exports], plan.checkpoints
    options = BuildOptions(checkpoints=checkpoints,
                           stage_timeout=request.stage_timeout,
                           **({"jobs": request.jobs} if request.jobs else {}))
    recorder = Recorder()
    history = History(store.root)
    try:
        stream_fd: int | None = history.new_stream()
    except OSError:  # a store we can read but not write fails later with a better message
        stream_fd = None
    monitors: list[Monitor] = [recorder, monitor]
    if stream_fd is not None:
        monitors.insert(1, SavedStream(stream_fd))
    tee = Tee(*monitors)
    sources = Sources(store, manifest.sources, tee, download=request.download,
                      only=needed_items(manifest, exports) if request.sources_only else None,
                      keep_going=request.sources_only, verify=request.sources_only,
                      library=lambda name: library.find("Source", name))
    ctx = BuildContext(manifest=manifest, store=store, library=library, monitor=tee,
                       sources=sources, options=options)
    try:
        if plan is not None:
            plan = planner.pin(plan, ctx.pins, stored)
    except BaseException:
        if stream_fd is not None:
            os.close(stream_fd)
        raise
    return Prepared(ctx=ctx, plan=plan, recorder=recorder, history=history, stream_fd=stream_fd)


def replan(ctx: BuildContext, goal: planner.Goal) -> planner.Plan:
    """The plan made again, and pinned, once the remote cache has brought entries into the store."""
    stored = planner.Predicate(ctx.store.contains)
    return planner.pin(planner.plan(goal, stored), ctx.pins, stored)


TICK = 0.2  # seconds between ticks: how stale a live view's elapsed times and coalesced lines can get


async def tick(monitor: Monitor) -> None:
    while True:
        monitor.tick()
        await anyio.sleep(TICK)


async def build(prepared: Prepared, request: Request) -> BuildReport:
    """Build the plan and export; the report says what happened, and why the build failed if it did.

    A failure of aosbuild's own kind (a stage, a source, the store) does not raise: it is the report's
    `error`, once everything is cleaned up, so that the caller has the report of a failed build too.
    Cancellation, interrupts and bugs propagate. The store's record of stage durations and its saved
    streams are brought up to date at the end, whatever the outcome.
    """
    ctx, plan = prepared.ctx, prepared.plan
    success = False
    error: AosbuildError | None = None
    try:
        try:
            async with remote_cache(request.remote, lambda text: warn(ctx, text)) as remote:
                ctx.remote = remote
                if remote is not None:
                    ctx.sources.mirror = functools.partial(remote.fetch_source,
                                                           most=ctx.store.limits().sources_max_size)
                if plan is not None:
                    goal = plan.goal
                    if remote is not None:
                        from . import remotecache

                        plan = await remotecache.pull_ahead(ctx, plan, lambda: replan(ctx, goal))
                    ctx.monitor.build_planned(planned_stages(plan, prepared.history.durations()))
                    ctx.monitor.build_started(request.label, sources=len(ctx.sources.sources),
                                              pipelines=len(plan.build))
                else:
                    ctx.monitor.build_started(request.label, sources=len(ctx.sources.sources), pipelines=0)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(tick, ctx.monitor)
                    try:
                        await run(ctx, plan, request)
                    finally:
                        tg.cancel_scope.cancel()
            success = True
        except Exception as exc:
            errors = list(flatten(exc))
            error = next((e for e in errors if isinstance(e, AosbuildError)), None)
            if error is None or not all(isinstance(e, AosbuildError) for e in errors):
                raise
        finally:
            await release(ctx)
            ctx.monitor.build_finished(request.label, success=success)
    finally:
        if prepared.stream_fd is not None:
            os.close(prepared.stream_fd)
    report = prepared.recorder.report(request.label, success=success, sources=ctx.sources.results, error=error)
    with contextlib.suppress(OSError):  # the record only ever improves estimates
        prepared.history.record(report.timed())
        prepared.history.prune()
    return report


async def run(ctx: BuildContext, plan: planner.Plan | None, request: Request) -> None:
    if plan is None:
        await ctx.sources.fetch_all()
        return
    report_cached(ctx, plan.cached)
    if request.executor is None:
        if plan.build:
            pidns.start_soon()  # the sandboxes' pid namespace, made while the first stage is set up
        await scheduler.run(ctx, plan)
    else:
        await request.executor.run(ctx, plan.build, request)
    for name, pipeline in plan.exports:
        assert request.output_directory is not None
        await export(ctx, pipeline, name, request.output_directory)
    if ctx.remote is not None:
        from . import remotecache

        await remotecache.push_built(ctx, plan)


@contextlib.asynccontextmanager
async def remote_cache(settings: RemoteSettings | None,
                       warn: Callable[[str], None]) -> AsyncIterator[RemoteCache | None]:
    """The build's remote cache (`remotecache.open_remote_cache`), None without one; the registry client
    (httpx) is imported only by builds that use a registry."""
    if settings is None:
        yield None
        return
    from . import remotecache

    async with remotecache.open_remote_cache(settings, warn) as remote:
        yield remote


def warn(ctx: BuildContext, message: str) -> None:
    """A warning the user must see whatever the monitor: on it, and on stderr (--json, --quiet)."""
    ctx.monitor.log(message + "\n")
    log.warning("remote_cache", message=message)
