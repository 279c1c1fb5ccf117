"""Planning and running the pipelines of a build as a DAG.

`plan` picks what must be built for the requested pipelines: each one that is not in the store, resumed
after its newest cached stage, plus whatever it still needs (its build root and the pipelines its
remaining stages read). What it finds in the store it pins (read-locks) for the whole build, so no other
build evicts it meanwhile; an entry it cannot lock is a miss, and built. `run` starts every planned
pipeline at once; each waits for exactly what it needs, then for one of `--jobs` slots. The first
failure cancels everything else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import anyio

from .builder import build_pipeline, resume_point
from .context import BuildContext
from .errors import UsageError
from .manifest import Pipeline


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    build: tuple[Planned, ...]   # to build, dependencies first
    cached: tuple[Pipeline, ...]  # found whole in the store (pinned), reported from it


@dataclass(frozen=True, slots=True, kw_only=True)
class Planned:
    pipeline: Pipeline
    resume: int                  # stages already in the store
    needs: frozenset[str]        # ids of pipelines that must be built first


def plan(ctx: BuildContext, targets: Iterable[Pipeline]) -> Plan:
    """The pipelines to build, dependencies first (a pipeline in the store is not rebuilt).

    Pipelines found in the store are the plan's `cached`, with those they were built from that are in the
    store too, so that the build can report their stages as the build that stored them did.
    """
    planned: dict[str, Planned] = {}
    cached: set[str] = set()
    found_pipelines: list[Pipeline] = []

    def found(pipeline_id: str) -> None:
        pipeline = ctx.manifest.by_id(pipeline_id)
        if pipeline_id in cached or pipeline is None:
            return
        cached.add(pipeline_id)
        for dep in sorted(pipeline.dependencies()):
            if dep not in planned and ctx.store.contains(dep) and ctx.pins.try_pin(dep):
                found(dep)
        found_pipelines.append(pipeline)

    def visit(pipeline_id: str, wanted_by: str) -> None:
        if pipeline_id in planned or pipeline_id in cached:
            return
        if ctx.pins.try_pin(pipeline_id):
            found(pipeline_id)
            return
        pipeline = ctx.manifest.by_id(pipeline_id)
        if pipeline is None:
            raise UsageError(f"{wanted_by} needs pipeline {pipeline_id}, which is neither in the manifest "
                             "nor in the store: add that pipeline to the manifest, or build the manifest that "
                             "has it into this --store first")
        resume = resume_point(ctx, pipeline)
        needs = pipeline.dependencies(after=resume)
        for dep in sorted(needs):
            visit(dep, f"pipeline '{pipeline.name}'")
        planned[pipeline_id] = Planned(pipeline=pipeline, resume=resume, needs=frozenset(needs))

    for target in targets:
        if target.id is not None:
            visit(target.id, "the command line")
    return Plan(build=tuple(planned.values()), cached=tuple(found_pipelines))


async def run(ctx: BuildContext, planned: Sequence[Planned]) -> None:
    """Fetch sources and build the planned pipelines, each as soon as what it needs is ready."""
    built = {p.pipeline.id: anyio.Event() for p in planned}
    slots = anyio.CapacityLimiter(ctx.options.jobs)

    async def build_one(item: Planned) -> None:
        for dep in item.needs:
            if dep in built:
                await built[dep].wait()
        async with slots:
            await build_pipeline(ctx, item.pipeline, item.resume)
        built[item.pipeline.id].set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ctx.sources.fetch_all)
        for item in planned:
            tg.start_soon(build_one, item)
