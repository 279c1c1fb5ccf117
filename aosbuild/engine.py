"""One whole build: plan, fetch and build concurrently, export, and say what happened.

This is the async entry point the CLI runs on trio (or asyncio); it owns the build context and makes
sure the monitor hears the beginning and the end of the build, however it ends.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from . import scheduler
from .context import BuildContext, BuildOptions
from .download import DownloadOptions
from .errors import UsageError
from .exporting import export_target, export_tree
from .library import Library
from .manifest import Manifest, Pipeline
from .monitor import Monitor
from .results import StageResult
from .sources import Sources
from .store import Store


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


def resolve_exports(manifest: Manifest, exports: Sequence[str]) -> list[Pipeline]:
    pipelines = []
    for name in exports:
        pipeline = manifest.lookup(name)
        if pipeline is None:
            names = [p.name for p in manifest.pipelines]
            raise UsageError(f"Export {name} not found in {names}")
        pipelines.append(pipeline)
    return pipelines


def needed_items(manifest: Manifest, exports: Sequence[Pipeline]) -> frozenset[str] | None:
    """The source items the exported pipelines use, with their build roots and inputs, transitively.

    None means every item: nothing was exported, or the manifest is v1, whose stages name the files they
    use in their options rather than through inputs.
    """
    if not exports or manifest.version == "1":
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


def match_checkpoints(manifest: Manifest, patterns: Sequence[str]) -> frozenset[str]:
    """Stage ids matched by osbuild's checkpoint globs: pipeline names (last stage), stage ids and types."""
    matched: set[str] = set()
    for pattern in patterns:
        for pipeline in manifest.pipelines:
            if pipeline.id and fnmatch.fnmatch(pipeline.name, pattern):
                matched.add(pipeline.id)
            for stage in pipeline.stages:
                if fnmatch.fnmatch(stage.id, pattern) or fnmatch.fnmatch(stage.type, pattern):
                    matched.add(stage.id)
    if patterns and not matched:
        raise UsageError("No checkpoints matched provided patterns!")
    return frozenset(matched)


def collect_metadata(ctx: BuildContext) -> dict[str, dict[str, Any]]:
    """Stage metadata of the pipelines this build ran or found in the store, `{pipeline: {type: metadata}}`."""
    result: dict[str, dict[str, Any]] = {}
    for pipeline in ctx.manifest.pipelines:
        entries = {r.type: r.metadata for r in ctx.logs.get(pipeline.name, ()) if r.success and r.metadata}
        if entries:
            result[pipeline.name] = entries
    return result


async def export(ctx: BuildContext, pipeline: Pipeline, name: str, output_directory: Path) -> None:
    """Copy the pipeline's tree to OUTDIR/NAME, replacing what was there only when the copy is complete."""
    if pipeline.id is None:
        await export_tree(None, export_target(output_directory, name))
        return
    view, what = ctx.pins.view(pipeline.id), f"cannot export {name}"

    async def copy(src: Path, dst: Path) -> None:
        await ctx.store.copy_view(view, dst, what)

    await export_tree(view.layers[0], export_target(output_directory, name), copy=copy)


def report_cached(ctx: BuildContext) -> None:
    """Report the pipelines found in the store, stage by stage, as the build that stored them did."""
    for pipeline in ctx.cached:
        assert pipeline.id is not None
        ctx.monitor.pipeline_cached(pipeline)
        stages = {stage.id: stage for stage in pipeline.stages}
        results = ctx.logs[pipeline.name] = [StageResult.from_record(r) for r in ctx.pins.results(pipeline.id)]
        for result in results:
            if result.id in stages:
                ctx.monitor.stage_finished(pipeline, stages[result.id], result)


async def release(ctx: BuildContext) -> None:
    """Let go of the store: unpin what the build held, and mark the source items it used as used."""
    with anyio.CancelScope(shield=True):
        await ctx.pins.aclose()
        used = [ctx.sources.path(item.checksum) for items in ctx.sources.results.values() for item in items
                if item.error is None]
        await anyio.to_thread.run_sync(ctx.store.finish, used)


def prepare(manifest: Manifest, request: Request, *, store: Store, library: Library,
            monitor: Monitor) -> tuple[BuildContext, list[scheduler.Planned]]:
    """Check the request against the manifest and plan the build; nothing runs yet."""
    exports = resolve_exports(manifest, request.exports)
    options = BuildOptions(checkpoints=match_checkpoints(manifest, request.checkpoints),
                           stage_timeout=request.stage_timeout,
                           **({"jobs": request.jobs} if request.jobs else {}))
    sources = Sources(store, manifest.sources, monitor, download=request.download,
                      only=needed_items(manifest, exports) if request.sources_only else None,
                      keep_going=request.sources_only, verify=request.sources_only)
    ctx = BuildContext(manifest=manifest, store=store, library=library, monitor=monitor,
                       sources=sources, options=options)
    if request.sources_only:
        return ctx, []
    return ctx, scheduler.plan(ctx, exports or manifest.pipelines)


async def fetch_sources(ctx: BuildContext, request: Request) -> None:
    """`--sources-only`: fetch and verify every item, run no stage; raises the first failed item's error."""
    ctx.monitor.build_started(request.label, sources=len(ctx.sources.sources), pipelines=0)
    success = False
    try:
        await ctx.sources.fetch_all()
        success = True
    finally:
        await release(ctx)
        ctx.monitor.build_finished(request.label, success=success)


async def build(ctx: BuildContext, planned: list[scheduler.Planned], request: Request) -> None:
    """Build the plan and export; raises the first failure after everything is cleaned up."""
    if request.sources_only:
        await fetch_sources(ctx, request)
        return
    ctx.monitor.build_started(request.label, sources=len(ctx.manifest.sources), pipelines=len(planned))
    success = False
    try:
        report_cached(ctx)
        await scheduler.run(ctx, planned)
        for name, pipeline in zip(request.exports, resolve_exports(ctx.manifest, request.exports),
                                  strict=True):
            assert request.output_directory is not None
            await export(ctx, pipeline, name, request.output_directory)
        success = True
    finally:
        await release(ctx)
        ctx.monitor.build_finished(request.label, success=success)
